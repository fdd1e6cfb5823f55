"""Experiment trackers of a training run (rank 0): TensorBoard by default, Weights & Biases on request.

The flags are musubi-tuner's (``--log_with``, ``--logging_dir``, ``--log_prefix``, ``--log_tracker_name``,
``--log_tracker_config``, ``--log_config``, ``--wandb_run_name``, ``--wandb_api_key``) with one change of default:
TensorBoard is on unless ``--log_with none``, writing to ``<output_dir>/logs`` when ``--logging_dir`` is not given.

* Run folder: ``<logging_dir>/<output_name>_<YYYYmmddHHMMSS>``; with ``--log_prefix P`` it is musubi's
  ``<logging_dir>/<P><YYYYmmddHHMMSS>``.  A resumed run continues the folder recorded in its state (TensorBoard's
  ``purge_step`` hides the events a crashed run wrote after that state), and a wandb run continues by its id.
* ``--log_tracker_name``: the wandb project (musubi's default ``network_train``); TensorBoard events then go to
  ``<run folder>/<name>``, where accelerate (and so musubi) puts them.
* ``--log_tracker_config FILE``: TOML with a ``[wandb]`` table (keyword arguments of ``wandb.init``) and/or a
  ``[tensorboard]`` table (keyword arguments of ``SummaryWriter``, e.g. ``flush_secs``).
* ``--log_config``: the run's flags (paths and the API key left out, as musubi) go to the trackers.

wandb is optional and imported only when asked for; a missing package is a one-line error with the install hint,
checked at start-up.  ``WANDB_MODE=offline`` writes the run under the run folder without a network.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kandinsky5.common import UserError, get_logger

log = get_logger(__name__)

LOG_WITH = ("tensorboard", "wandb", "all", "none")
DEFAULT_TRACKER_NAME = "network_train"  # musubi's
SECRET_ARGS = ("wandb_api_key", "huggingface_token")
PATH_ARGS = ("dit", "vae", "text_encoder_qwen", "text_encoder_clip", "network_weights", "output_dir", "logging_dir",
             "dataset_config", "sample_prompts", "resume", "config_file", "log_tracker_config")  # fmt: skip


@dataclass(frozen=True)
class TrackerConfig:
    log_with: str = "tensorboard"  # tensorboard | wandb | all | none
    logging_dir: Path | None = None  # parent of the run folders; None = <output_dir>/logs
    log_prefix: str | None = None
    tracker_name: str | None = None
    tracker_config: Path | None = None
    log_config: bool = False
    wandb_run_name: str | None = None
    wandb_api_key: str | None = field(default=None, repr=False)
    flags: tuple[tuple[str, Any], ...] = ()  # --log_config: the sanitized flags sent to the trackers

    @property
    def run_config(self) -> dict[str, Any] | None:
        return dict(self.flags) if self.log_config else None

    @property
    def backends(self) -> tuple[str, ...]:
        return {"none": (), "all": ("tensorboard", "wandb")}.get(self.log_with, (self.log_with,))

    def check(self) -> dict[str, dict]:
        """Start-up checks (before any model loads); returns the ``--log_tracker_config`` tables."""
        if self.log_with not in LOG_WITH:
            raise UserError(f"--log_with {self.log_with!r}: choose one of {', '.join(LOG_WITH)}")
        if "wandb" in self.backends and importlib.util.find_spec("wandb") is None:
            raise UserError(f"--log_with {self.log_with} needs the wandb package: pip install wandb")
        if not self.backends and (self.tracker_config or self.wandb_run_name or self.wandb_api_key):
            log.warning("--log_with none: the tracker flags (--log_tracker_config, --wandb_*) have no effect")
        return _read_tracker_config(self.tracker_config)


def add_tracker_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging and trackers (musubi's flags; see docs/training.md)")
    g.add_argument("--logging_dir", default=None,
                   help="parent of the run folders <output_name>_<time> (TensorBoard events, loss.png, "
                        "history.json); default <output_dir>/logs")  # fmt: skip
    g.add_argument(
        "--log_with",
        choices=LOG_WITH,
        default="tensorboard",
        help="tracker: tensorboard (default), wandb (pip install wandb), all (both) or none",
    )
    g.add_argument(
        "--log_prefix", default=None, help="run folder <prefix><time> instead of <output_name>_<time> (default: none)"
    )
    g.add_argument(
        "--log_tracker_name",
        default=None,
        help="wandb project (default network_train); TensorBoard events go to <run folder>/<name>",
    )
    g.add_argument(
        "--log_tracker_config",
        default=None,
        help="TOML with [wandb] (wandb.init arguments) and/or [tensorboard] (SummaryWriter arguments); default none",
    )
    g.add_argument(
        "--log_config",
        action="store_true",
        help="send the run's flags to the trackers (paths and the API key left out; default off)",
    )
    g.add_argument("--wandb_run_name", default=None, help="name of the wandb run (default: wandb's)")
    g.add_argument("--wandb_api_key", default=None, help="log in to wandb with this key first (default: wandb's login)")


def tracker_config_from_args(args: argparse.Namespace) -> TrackerConfig:
    cfg = TrackerConfig(
        log_with=args.log_with,
        logging_dir=Path(args.logging_dir) if args.logging_dir else None,
        log_prefix=args.log_prefix,
        tracker_name=args.log_tracker_name,
        tracker_config=Path(args.log_tracker_config) if args.log_tracker_config else None,
        log_config=args.log_config,
        wandb_run_name=args.wandb_run_name,
        wandb_api_key=args.wandb_api_key,
        flags=tuple(sorted(sanitized_config(vars(args)).items())) if args.log_config else (),
    )
    cfg.check()
    return cfg


def _read_tracker_config(path: Path | None) -> dict[str, dict]:
    if path is None:
        return {}
    import toml

    if not Path(path).is_file():
        raise UserError(f"--log_tracker_config {path} does not exist")
    try:
        data = toml.load(path)
    except (toml.TomlDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--log_tracker_config {path} is not valid TOML: {exc}") from None
    bad = [k for k, v in data.items() if k not in ("wandb", "tensorboard") or not isinstance(v, dict)]
    if bad:
        raise UserError(
            f"--log_tracker_config {path}: unknown entry {bad[0]!r}; use [wandb] and/or [tensorboard] tables"
        )
    return data


def sanitized_config(args: Mapping[str, Any]) -> dict[str, Any]:
    """The flags for ``--log_config``: no secrets, no paths (as musubi); non-scalar values as strings."""
    out = {}
    for key, value in args.items():
        if key in SECRET_ARGS or key in PATH_ARGS:
            continue
        out[key] = value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
    return out


def new_run_folder(cfg: TrackerConfig, output_dir: Path, output_name: str) -> Path:
    """A fresh run folder name (not created): ``<output_name>_<time>``, or ``<prefix><time>``; never an existing
    folder (a second run in the same second gets ``-1``, ``-2``, ...)."""
    parent = cfg.logging_dir if cfg.logging_dir is not None else output_dir / "logs"
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
    base = parent / (f"{cfg.log_prefix}{stamp}" if cfg.log_prefix is not None else f"{output_name}_{stamp}")
    path, n = base, 0
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


class _TensorBoard:
    def __init__(self, folder: Path, purge_step: int | None, config: Mapping | None, kwargs: Mapping):
        from torch.utils.tensorboard import SummaryWriter

        try:
            self.writer = SummaryWriter(str(folder), purge_step=purge_step, **{"flush_secs": 10, **kwargs})
        except TypeError as exc:
            raise UserError(f"--log_tracker_config [tensorboard]: {exc} (keys are SummaryWriter arguments)") from None
        if config:
            self.writer.add_text("config", "```\n" + json.dumps(dict(config), indent=1, default=str) + "\n```", 0)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def image(self, tag: str, image: np.ndarray, step: int, caption: str) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, cfg: TrackerConfig, folder: Path, run_id: str | None, config: Mapping | None, kwargs):
        import wandb

        self.wandb = wandb
        if cfg.wandb_api_key:
            wandb.login(key=cfg.wandb_api_key)
        folder.mkdir(parents=True, exist_ok=True)
        init = {"project": cfg.tracker_name or DEFAULT_TRACKER_NAME, "name": cfg.wandb_run_name, "dir": str(folder),
                "config": dict(config) if config else None, **kwargs}  # fmt: skip
        if run_id:
            init.update(id=run_id, resume="allow")
        self.run = wandb.init(**init)
        self.run_id = self.run.id

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def image(self, tag: str, image: np.ndarray, step: int, caption: str) -> None:
        self.run.log({tag: self.wandb.Image(image, caption=caption)}, step=step)

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """Fan-out to the selected backends; with none selected every call does nothing."""

    def __init__(self, folder: Path | None, backends: list):
        self.folder, self.backends = folder, backends

    @property
    def enabled(self) -> bool:
        return bool(self.backends)

    @property
    def wandb_id(self) -> str | None:
        return next((b.run_id for b in self.backends if isinstance(b, _Wandb)), None)

    @property
    def tensorboard(self) -> bool:
        return any(isinstance(b, _TensorBoard) for b in self.backends)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for b in self.backends:
            b.scalars(values, step)

    def image(self, tag: str, image: np.ndarray, step: int, caption: str = "") -> None:
        for b in self.backends:
            b.image(tag, image, step, caption)

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []


def open_tracker(
    cfg: TrackerConfig, folder: Path, resume_step: int | None = None, wandb_id: str | None = None,
    config: Mapping | None = None,
) -> Tracker:  # fmt: skip
    """Open the backends of ``cfg`` on run folder ``folder`` (``resume_step``: continue it after that step)."""
    tables = cfg.check()
    backends: list = []
    purge = resume_step + 1 if resume_step is not None else None
    if "tensorboard" in cfg.backends:
        tb_folder = folder / cfg.tracker_name if cfg.tracker_name else folder
        backends.append(_TensorBoard(tb_folder, purge, config, tables.get("tensorboard", {})))
    if "wandb" in cfg.backends:
        backends.append(_Wandb(cfg, folder, wandb_id, config, tables.get("wandb", {})))
    return Tracker(folder if backends else None, backends)
