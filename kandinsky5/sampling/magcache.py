"""MagCache step skipping (official ``kandinsky/magcache_utils.py``) and its calibration, outside the DiT's blocks.

MagCache reuses the visual blocks' residual ``r = blocks(tokens) - tokens`` of an earlier step instead of running
the visual decoder stack; the embeddings, the text blocks and the output layer always run.  The sampler loop asks
:meth:`MagCache.blocks` for a replacement of ``DiT.run_visual_blocks`` before each DiT call (``DiT.forward``'s
``visual_blocks`` argument), so the decision lives at the sampler level and compiled or swapped blocks are untouched.

Rule (official, per stream s: 0 = cond, 1 = uncond; DiT call index ``c = 2 k + s`` at step k):

* ratio table ``m = [1, 1] + mag_ratios`` (length 2N), resampled per stream by official ``nearest_interp`` when the
  ratios were made for another step count;
* calls with ``c < int(2N * retention_ratio)`` always run;
* otherwise ``R_s *= m[c]``, ``n_s += 1``, ``E_s += |1 - R_s|``; the call is skipped (cached residual added to its
  input tokens) when ``E_s < thresh`` and ``n_s <= K``, else it runs and ``R_s, n_s, E_s = 1, 0, 0``;
* every call stores its residual as the stream's cache.  (Official crashes when a skip comes before any residual
  exists, e.g. retention 0; we run that call instead.)

Streams stay separate whether CFG is one batched call (rows ``[cond B | uncond B]``) or two: in a batched call only
the rows of the streams that run go through the blocks.  Without CFG only stream 0 is used (official ``no_cfg``).

Calibration (:class:`Calibrator`) runs every call and records, per stream and step k >= 1, the mean over tokens of
``|r_k| / |r_{k-1}|`` (L2 over channels), the quantity of the official ratios (the ``calibration_forward.py``
published in ai-forever/Kandinsky-5 overwrites the cached residual before dividing, so it prints 1; we divide by the
previous step's residual, as MagCache defines it).

Ratio layout everywhere (official yaml ``magcache.mag_ratios``, our JSON): ``mag_ratios[2 (k - 1) + s]`` for k = 1 ..
N - 1, with 0 in the uncond places of a run without CFG.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kandinsky5.common import UserError, get_logger
from kandinsky5.configs import TASKS, TaskConfig
from kandinsky5.files import read_json, write_text
from kandinsky5.model import flow
from kandinsky5.preflight import check_output_dir

__all__ = [
    "OFFICIAL_RATIOS_FILE",
    "FILE_FORMAT",
    "DEFAULT_THRESH",
    "DEFAULT_K",
    "DEFAULT_RETENTION_RATIO",
    "MagRatios",
    "MagCacheConfig",
    "MagCache",
    "Calibrator",
    "official_ratios",
    "tasks_with_ratios",
    "nearest_interp",
    "ratio_table",
    "read_ratios_file",
    "magcache_from_args",
    "calibrator_from_args",
]

log = get_logger(__name__)

OFFICIAL_RATIOS_FILE = Path(__file__).resolve().parents[1] / "magcache_ratios.json"
FILE_FORMAT = "kandinsky5-tuner-magcache-ratios"
DEFAULT_THRESH, DEFAULT_K, DEFAULT_RETENTION_RATIO = 0.12, 2, 0.2  # official set_magcache_params
COND, UNCOND = 0, 1
STREAM_NAMES = ("cond", "uncond")


# ----------------------------------------------------------------------------------------------------------------
# ratios
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MagRatios:
    """Calibrated magnitude ratios (official layout, ``2 * (steps - 1)`` values) and where they come from."""

    values: tuple[float, ...]
    steps: int  # the step count they were measured with
    source: str  # "configs/k5_pro_t2v_5s_sft_sd.yaml (official)" or the calibration file
    cfg: bool = True  # False: no uncond stream was measured (zeros in the uncond places)
    checkpoint: str = ""  # file name of the DiT they were measured on
    checkpoint_hash: str = ""  # kandinsky5.model.loading.file_fingerprint of it ("" for the official ratios)

    def __post_init__(self) -> None:
        if self.steps < 2 or len(self.values) != 2 * (self.steps - 1):
            raise ValueError(f"{len(self.values)} ratios for {self.steps} steps (want 2 * (steps - 1))")


def nearest_interp(values: np.ndarray, length: int) -> np.ndarray:
    """Official ``nearest_interp``: ``length`` samples of ``values`` at rounded (half-to-even) evenly spaced indices."""
    if length == 1:
        return np.array([values[-1]])
    scale = (len(values) - 1) / (length - 1)
    return values[np.round(np.arange(length) * scale).astype(int)]


def ratio_table(ratios: MagRatios, steps: int) -> np.ndarray:
    """Per-call ratios (2 * steps,) float64: ``[1, 1] + values``, resampled per stream as official does."""
    table = np.array([1.0, 1.0, *ratios.values])
    if len(table) == 2 * steps:
        return table
    streams = [nearest_interp(table[s::2], steps) for s in (COND, UNCOND)]
    return np.stack(streams, axis=1).reshape(-1)


def _official_data() -> dict:
    with open(OFFICIAL_RATIOS_FILE, encoding="utf-8") as f:
        return json.load(f)["configs"]


def official_ratios(task: TaskConfig) -> MagRatios | None:
    """The official ratios of the task's official config (``TaskConfig.official_config``), if it has any."""
    entry = _official_data().get(task.official_config) if task.official_config else None
    if entry is None:
        return None
    values = tuple(float(v) for v in entry["mag_ratios"])
    cfg = any(values[1::2])
    return MagRatios(values, entry["steps"], f"{entry['source']} (official)", cfg, entry["checkpoint"])


def tasks_with_ratios() -> list[str]:
    data = _official_data()
    return [name for name, t in TASKS.items() if t.official_config in data]


# ----------------------------------------------------------------------------------------------------------------
# the skip state machine
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MagCacheConfig:
    """``--magcache``: the ratios and the official knobs.  ``start`` makes the state for one video."""

    ratios: MagRatios
    thresh: float = DEFAULT_THRESH  # accumulated-error threshold (0 = never skip)
    K: int = DEFAULT_K  # at most K consecutive skips per stream
    retention_ratio: float = DEFAULT_RETENTION_RATIO  # this share of the first DiT calls always runs

    def start(self, steps: int, cfg: bool) -> MagCache:
        return MagCache(self, steps, cfg)

    def describe(self) -> str:
        return f"thresh {self.thresh}, K {self.K}, retention_ratio {self.retention_ratio}, ratios {self.ratios.source}"


@dataclass
class _Stream:
    ratio: float = 1.0
    steps: int = 0
    err: float = 0.0
    residual: torch.Tensor | None = None
    skipped: int = 0
    calls: int = 0


def _split(streams: Sequence[int], rows: int) -> list[slice]:
    """Row slices of each stream in a call holding ``len(streams)`` equal groups of rows."""
    if rows % len(streams):
        raise ValueError(f"{rows} rows do not split into {len(streams)} streams")
    b = rows // len(streams)
    return [slice(i * b, (i + 1) * b) for i in range(len(streams))]


def _take(index: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.index_select(0, index.to(t.device)) for t in tensors]


class MagCache:
    """MagCache state of one video: per-stream accumulators and residual caches, and the skip counts."""

    def __init__(self, config: MagCacheConfig, steps: int, cfg: bool):
        self.config, self.steps = config, steps
        self.table = ratio_table(config.ratios, steps)
        self.retain = int(2 * steps * config.retention_ratio)  # official: cnt >= int(num_steps * retention_ratio)
        self.streams = [_Stream(), _Stream()]
        self.decisions: list[tuple[int, int, bool]] = []  # (step, stream, skipped), in call order
        if steps != config.ratios.steps:
            log.info("MagCache: ratios made for %d steps, resampled to %d (nearest, as official)",
                     config.ratios.steps, steps)  # fmt: skip
        if cfg and not config.ratios.cfg:
            log.warning("MagCache: the ratios (%s) have no uncond stream: the uncond pass is never skipped",
                        config.ratios.source)  # fmt: skip

    def _skip(self, step: int, stream: int) -> bool:
        """Official decision for DiT call ``2 * step + stream`` (updates the accumulators)."""
        call, st = 2 * step + stream, self.streams[stream]
        if call < self.retain:
            return False
        st.ratio = st.ratio * self.table[call]
        st.steps += 1
        st.err += abs(1.0 - st.ratio)
        if st.err < self.config.thresh and st.steps <= self.config.K and st.residual is not None:
            return True
        st.ratio, st.steps, st.err = 1.0, 0, 0.0
        return False

    def blocks(self, step: int, streams: Sequence[int]) -> Callable[..., torch.Tensor]:
        """The ``visual_blocks`` function for step ``step``'s DiT call whose rows are ``streams`` (equal groups)."""
        skip = [self._skip(step, s) for s in streams]
        for s, skipped in zip(streams, skip):
            self.decisions.append((step, s, skipped))
            self.streams[s].calls += 1
            self.streams[s].skipped += skipped

        def visual_blocks(run, tokens, text, time_embed, rope, text_mask, attend):
            parts = _split(streams, tokens.shape[0])
            if any(skip):
                return self._partial(run, streams, parts, skip, tokens, text, time_embed, rope, text_mask, attend)
            out = run(tokens, text, time_embed, rope, text_mask, attend)
            for s, part in zip(streams, parts):
                self.streams[s].residual = out[part] - tokens[part]
            return out

        return visual_blocks

    def _partial(self, run, streams, parts, skip, tokens, text, time_embed, rope, text_mask, attend) -> torch.Tensor:
        """Run the blocks on the rows of the streams that compute; add the cached residual to the others (whose
        cache stays as it is, as official keeps the same tensor)."""
        ran = [p for p, skipped in zip(parts, skip) if not skipped]
        computed = []
        if ran:
            index = torch.cat([torch.arange(p.start, p.stop) for p in ran])
            rows, txt, temb, mask = _take(index, tokens, text, time_embed, text_mask)
            computed = list(run(rows, txt, temb, rope, mask, attend).split([p.stop - p.start for p in ran]))
        pieces = []
        for s, part, skipped in zip(streams, parts, skip):
            if skipped:
                pieces.append(tokens[part] + self.streams[s].residual)
                continue
            out = computed.pop(0)
            self.streams[s].residual = out - tokens[part]
            pieces.append(out)
        return torch.cat(pieces)

    @property
    def skipped(self) -> int:
        return sum(s.skipped for s in self.streams)

    @property
    def calls(self) -> int:
        return sum(s.calls for s in self.streams)

    def finish(self) -> None:
        """Log the skip count and free the cached residuals."""
        per = ", ".join(f"{STREAM_NAMES[i]} {s.skipped}/{s.calls}" for i, s in enumerate(self.streams) if s.calls)
        log.info("MagCache: skipped the visual blocks of %d of %d DiT calls (%s); %s", self.skipped, self.calls, per,
                 self.config.describe())  # fmt: skip
        for s in self.streams:
            s.residual = None


# ----------------------------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------------------------


class _Recorder:
    """One calibration video: runs every call and records the per-step magnitude ratio of each stream."""

    def __init__(self, calibrator: Calibrator, steps: int, cfg: bool):
        self.calibrator, self.steps, self.cfg = calibrator, steps, cfg
        self.previous: dict[int, torch.Tensor] = {}
        self.ratios: dict[tuple[int, int], float] = {}

    def blocks(self, step: int, streams: Sequence[int]) -> Callable[..., torch.Tensor]:
        def visual_blocks(run, tokens, *rest):
            out = run(tokens, *rest)
            for s, part in zip(streams, _split(streams, tokens.shape[0])):
                norm = (out[part].float() - tokens[part].float()).norm(dim=-1)  # (B, S) per-token residual size
                if s in self.previous:
                    self.ratios[(step, s)] = (norm / self.previous[s]).mean().item()
                self.previous[s] = norm
            return out

        return visual_blocks

    def finish(self) -> None:
        self.previous.clear()
        self.calibrator.runs.append(self)
        log.info("MagCache calibration: recorded %d ratios of video %d", len(self.ratios), len(self.calibrator.runs))


@dataclass
class Calibrator:
    """``--magcache_calibrate FILE``: every video runs in full and adds its ratios; ``write`` averages them."""

    task: TaskConfig
    runs: list[_Recorder] = field(default_factory=list)

    def start(self, steps: int, cfg: bool) -> _Recorder:
        if steps < 2 or (self.runs and (self.runs[0].steps, self.runs[0].cfg) != (steps, cfg)):
            raise ValueError(f"calibration videos need one step count >= 2 and one CFG setting; got {steps}, {cfg}")
        return _Recorder(self, steps, cfg)

    def values(self) -> list[float]:
        """Mean ratio per (step, stream) over the recorded videos, official layout, rounded to 5 digits."""
        steps, cfg = self.runs[0].steps, self.runs[0].cfg
        out = []
        for k in range(1, steps):
            for s in (COND, UNCOND):
                got = [r.ratios[(k, s)] for r in self.runs if (k, s) in r.ratios]
                out.append(round(sum(got) / len(got), 5) if got and (cfg or s == COND) else 0.0)
        if not all(math.isfinite(v) for v in out):
            raise UserError("--magcache_calibrate: the measured ratios are not finite (a residual was zero or NaN)")
        return out

    def write(self, path: str | Path, meta: dict, overwrite: bool = False) -> Path:
        """Write the JSON file (atomically); ``meta`` adds checkpoint, LoRAs and sampling settings."""
        if not self.runs:
            raise UserError("--magcache_calibrate: no video was generated, nothing to write")
        path = Path(path)
        if path.exists() and not overwrite:
            raise UserError(f"--magcache_calibrate {path} already exists; pass --overwrite to replace it")
        doc = {
            "format": FILE_FORMAT,
            "version": 1,
            "task": self.task.name,
            **meta,
            "steps": self.runs[0].steps,
            "cfg": self.runs[0].cfg,
            "videos": len(self.runs),
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "layout": "mag_ratios[2*(k-1) + s], k = 1..steps-1, s = 0 cond / 1 uncond (as the official configs)",
            "mag_ratios": self.values(),
        }
        write_text(path, json.dumps(doc, indent=1) + "\n", "--magcache_calibrate")
        log.info("MagCache calibration: wrote %d ratios for %d steps to %s", len(doc["mag_ratios"]), doc["steps"], path)
        return path


def read_ratios_file(path: str | Path, task: TaskConfig) -> MagRatios:
    """A ``--magcache_calibrate`` file for ``task``; every problem is a one-line UserError naming the file."""
    where = f"--magcache_ratios {path}"
    if not Path(path).exists():
        raise UserError(f"{where} does not exist (write one with --magcache_calibrate)")
    doc = read_json(path, "--magcache_ratios")
    if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
        raise UserError(f'{where} is not a MagCache ratios file (no "format": "{FILE_FORMAT}")')
    if doc.get("task") != task.name:
        raise UserError(f"{where} was calibrated for task {doc.get('task')!r}, not {task.name}; calibrate for it")
    values, steps = doc.get("mag_ratios"), doc.get("steps")
    ok = isinstance(values, list) and all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values)
    if not ok or not isinstance(steps, int) or steps < 2 or len(values) != 2 * (steps - 1):
        raise UserError(f'{where}: want "steps" >= 2 and 2 * (steps - 1) finite ratios >= 0 in "mag_ratios"')
    return MagRatios(
        tuple(float(v) for v in values),
        steps,
        str(path),
        bool(doc.get("cfg", True)),
        str(doc.get("checkpoint", "")),
        str(doc.get("checkpoint_hash", "")),
    )


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------

_KNOBS = ("magcache_thresh", "magcache_K", "magcache_retention_ratio", "magcache_ratios")


def _no_ratios_error(task: TaskConfig) -> UserError:
    return UserError(
        f"--magcache: task {task.name} has no official MagCache ratios (tasks with them: "
        f"{', '.join(tasks_with_ratios())}); run once with --magcache_calibrate FILE, then use --magcache_ratios FILE"
    )


def _check_knobs(thresh: float, K: int, retention: float) -> None:
    if not (math.isfinite(thresh) and thresh >= 0):
        raise UserError(f"--magcache_thresh must be >= 0, got {thresh}")
    if K < 0:
        raise UserError(f"--magcache_K must be >= 0, got {K}")
    if not 0 <= retention <= 1:
        raise UserError(f"--magcache_retention_ratio must be in [0, 1], got {retention}")


def magcache_from_args(args, task: TaskConfig) -> MagCacheConfig | None:
    """``--magcache`` and its knobs -> config (None when off); checked before any model loads."""
    enabled = bool(args.magcache or args.magcache_ratios)
    if not enabled:
        given = [k for k in _KNOBS if getattr(args, k) is not None]
        if given:
            raise UserError(f"--{given[0]} has no effect without --magcache")
        return None
    if getattr(args, "magcache_calibrate", None):
        raise UserError("--magcache_calibrate runs every step to measure; it cannot be combined with --magcache")
    ratios = read_ratios_file(args.magcache_ratios, task) if args.magcache_ratios else official_ratios(task)
    if ratios is None:
        raise _no_ratios_error(task)
    thresh = DEFAULT_THRESH if args.magcache_thresh is None else args.magcache_thresh
    K = DEFAULT_K if args.magcache_K is None else args.magcache_K
    retention = DEFAULT_RETENTION_RATIO if args.magcache_retention_ratio is None else args.magcache_retention_ratio
    _check_knobs(thresh, K, retention)
    _warn_other_checkpoint(ratios, getattr(args, "dit", None))
    return MagCacheConfig(ratios, thresh, K, retention)


def _warn_other_checkpoint(ratios: MagRatios, dit: str | None) -> None:
    """Ratios belong to the weights they were measured on: say so when --dit is another file."""
    if not dit or not Path(dit).is_file():
        return
    if ratios.checkpoint_hash:
        from kandinsky5.model.loading import file_fingerprint

        other = file_fingerprint(dit) != ratios.checkpoint_hash
    else:
        other = bool(ratios.checkpoint) and Path(dit).name != ratios.checkpoint
    if other:
        log.warning("MagCache ratios %s were measured on %s, --dit is %s: for other weights calibrate with "
                    "--magcache_calibrate", ratios.source, ratios.checkpoint, dit)  # fmt: skip


def calibrator_from_args(args, task: TaskConfig, specs: Sequence) -> Calibrator | None:
    """``--magcache_calibrate FILE`` -> a calibrator; the file (writable, not clobbered) and the requests' sampling
    specs (same steps >= 2 and CFG on/off for all) are checked now, before any model loads."""
    path = getattr(args, "magcache_calibrate", None)
    if not path:
        return None
    kinds = {(spec.steps, flow.needs_uncond(spec.guidance)) for spec in specs}
    if len(kinds) > 1:
        raise UserError("--magcache_calibrate: every prompt needs the same --steps and CFG on/off (guidance 1 or not)")
    if any(steps < 2 for steps, _ in kinds):
        raise UserError(f"--magcache_calibrate needs at least 2 steps, got {min(k[0] for k in kinds)}")
    path = Path(path)
    if path.is_dir() or (path.exists() and not args.overwrite):
        raise UserError(f"--magcache_calibrate {path} already exists; pass --overwrite to replace it (a JSON file)")
    check_output_dir(path.parent, "--magcache_calibrate")
    return Calibrator(task)
