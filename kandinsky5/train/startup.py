"""Start-up checks of a training run, all before the DiT loads (``check_run``; docs/training.md section 5):

1. the output files: an earlier run's ``<name>.safetensors``, ``<name>-state/``, step / epoch files or samples
   in ``--output_dir`` are refused unless ``--overwrite`` or ``--resume`` of one of that run's own states;
2. ``--resume``: the state's ``progress.json`` and ``network.safetensors`` header must match this run (task,
   process count, --fsdp or not, optimizer class, mixed precision, network module, rank, alpha, targets);
3. ``--network_weights`` and ``--dit``: the files are complete safetensors, a recorded ``k5_task`` of another
   family is a warning, and a LoRA whose shapes do not fit the network is an error;
4. ``--output_dir`` (and ``--logging_dir``) can be written and have room for the checkpoints this run keeps
   (LoRA size x files kept, plus the states); this tool's leftovers of killed runs there are removed.

The LoRA is built once on the meta device (no memory, no weights) from the task's DiT shapes to know its exact
size and parameter names; that takes under a second even for the 19B Pro model.
"""

from __future__ import annotations

import argparse
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from kandinsky5.common import UserError, get_logger
from kandinsky5.files import load_safetensors, read_safetensors_header
from kandinsky5.preflight import check_not_overwriting, check_output_dir, clean_leftovers, warn_task_mismatch
from kandinsky5.train.config import TrainConfig
from kandinsky5.train.distributed import DistContext, broadcast_object
from kandinsky5.train.optim import optimizer_class, optimizer_class_name
from kandinsky5.train.prechecks import import_network_module
from kandinsky5.train.state import read_progress

__all__ = ["add_safety_args", "MetaNetwork", "run_files", "estimate_output_bytes", "check_run"]

log = get_logger(__name__)

_OPTIMIZER_STATE_FACTOR = {"AdamW8bit": 0.5, "Adafactor": 0.1}  # x LoRA bytes; others (Adam-like): 2


def add_safety_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("safety checks at start-up (see docs/training.md section 5)")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of an earlier run with the same --output_dir/--output_name (default: refuse)",
    )
    g.add_argument(
        "--allow_stale_cache",
        action="store_true",
        help="train on caches made with other settings than the current dataset TOML (caption, bucket, frames, "
        "VAE) with a warning, instead of stopping (default: stop and name the caching script to re-run)",
    )


# ------------------------------------------------------------------------------------------------------------
# the LoRA on the meta device
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaNetwork:
    """Names, shapes and size of the run's LoRA, built on the meta device."""

    network: torch.nn.Module
    shapes: dict[str, tuple[int, ...]]  # network.state_dict() (what a state's network.safetensors holds)
    alpha: float  # as the network applies it (alpha None / 0 means alpha = rank)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.network.state_dict().values())


def meta_network(cfg: TrainConfig) -> MetaNetwork:
    """The LoRA of this run on a meta DiT; a bad ``--network_args`` pattern fails here, before loading."""
    from kandinsky5.train.adapters import meta_network as build_on_meta

    n = cfg.network
    network = build_on_meta(cfg, import_network_module(n.module))  # --dim_from_weights: every key of the file checked
    alpha = n.alpha if n.alpha else float(n.dim)
    return MetaNetwork(network, {k: tuple(v.shape) for k, v in network.state_dict().items()}, alpha)


# ------------------------------------------------------------------------------------------------------------
# 1. files of an earlier run
# ------------------------------------------------------------------------------------------------------------


def _stem_pattern(name: str) -> str:
    return rf"{re.escape(name)}(?:-step\d{{8}}|-\d{{6}})?"


def run_files(cfg: TrainConfig) -> list[Path]:
    """Existing files and state dirs in ``--output_dir`` that a run named ``--output_name`` writes."""
    out, name = cfg.save.output_dir, cfg.save.output_name
    own = re.compile(_stem_pattern(name) + r"(?:\.safetensors|-state)")
    samples = re.compile(rf"{re.escape(name)}_\d{{6}}_\d{{2}}_-?\d+\.(?:mp4|png)")
    found = [p for p in sorted(out.iterdir()) if own.fullmatch(p.name)] if out.is_dir() else []
    sample_dir = out / "sample"
    if sample_dir.is_dir():
        found += [p for p in sorted(sample_dir.iterdir()) if samples.fullmatch(p.name)]
    return found


def _resumes_this_run(cfg: TrainConfig) -> bool:
    resume = cfg.resume
    if resume is None:
        return False
    same_dir = resume.absolute().parent == cfg.save.output_dir.absolute()
    return same_dir and re.fullmatch(_stem_pattern(cfg.save.output_name) + "-state", resume.name) is not None


def check_earlier_run(cfg: TrainConfig) -> None:
    if _resumes_this_run(cfg):
        return
    fix = (
        f"pass --overwrite to replace them, --resume one of its -state folders to continue that run, or choose "
        f"another --output_name (now {cfg.save.output_name!r})"
    )
    check_not_overwriting(run_files(cfg), cfg.overwrite, "--output_dir", fix)


# ------------------------------------------------------------------------------------------------------------
# 2. --resume
# ------------------------------------------------------------------------------------------------------------


def _mismatch(path: Path, what: str, saved: object, asked: object) -> UserError:
    return UserError(
        f"--resume {path} was saved with {what} {saved}, this run asks for {asked}; resume with the saved value "
        "(or start a new run without --resume)"
    )


def check_resume(cfg: TrainConfig, world_size: int, net: MetaNetwork | None) -> None:
    """The saved state fits this run (before anything big is loaded); one line naming saved and asked values."""
    path = cfg.resume
    meta = read_progress(path)
    n = cfg.network
    pairs = [
        ("--task", meta.get("task"), cfg.task.name),
        ("--num_processes", meta.get("world_size"), world_size),
        ("--mixed_precision", meta.get("mixed_precision"), cfg.mixed_precision),
        ("--network_module", meta.get("network_module"), n.module),
        ("--network_dim", meta.get("network_dim"), n.dim),
        ("--network_alpha", meta.get("network_alpha"), n.alpha),
        ("--optimizer_type", meta.get("optimizer_class"), optimizer_class_name(cfg.optimizer)),
    ]
    for what, saved, asked in pairs:
        if saved is not None and saved != asked:
            raise _mismatch(path, what, saved, asked)
    if meta["sharded"] != cfg.distributed.fsdp:
        saved = "with --fsdp" if meta["sharded"] else "without --fsdp"
        raise UserError(f"--resume {path} was saved {saved}; resume {saved} (the optimizer state layout differs)")
    targets = {k: meta.get("network_args", {}).get(k) for k in ("include_patterns", "exclude_patterns")}
    asked_targets = {k: repr(n.args[k]) if k in n.args else None for k in targets}
    if "network_args" in meta and targets != asked_targets:
        raise _mismatch(path, "--network_args targets", targets, asked_targets)
    saved_plus = "on" if "loraplus_lr_ratio" in meta.get("network_args", {}) else "off"
    asked_plus = "on" if "loraplus_lr_ratio" in n.args else "off"
    if "network_args" in meta and saved_plus != asked_plus:  # the optimizer's parameter groups differ
        raise _mismatch(path, "LoRA+ (--network_args loraplus_lr_ratio)", saved_plus, asked_plus)
    for name in ("scheduler.pt", "rng.pt") if meta["sharded"] else ("optimizer.pt", "scheduler.pt", "rng.pt"):
        _check_torch_file(path / name)
    if net is not None:
        _check_state_shapes(path, net)


def _check_torch_file(path: Path) -> None:
    """A torch.save file is a zip archive: its central directory (at the end) proves the file is complete."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(
            f"--resume {path} is damaged or incomplete ({exc}); resume from another state directory"
        ) from None


def _check_state_shapes(path: Path, net: MetaNetwork) -> None:
    saved = read_safetensors_header(path / "network.safetensors", "--resume").shapes()
    if set(saved) != set(net.shapes):
        raise _mismatch(path, "LoRA targets", f"{len(saved) // 3} modules", f"{len(net.shapes) // 3} modules")
    for key, shape in net.shapes.items():
        if saved[key] != shape:
            saved_rank, asked_rank = min(saved[key], default=0), min(shape, default=0)
            raise _mismatch(path, "--network_dim", saved_rank, asked_rank)
    if "network_alpha" not in read_progress(path):  # older states: compare the stored alpha buffers
        asked = float(net.alpha)
        alphas, _ = load_safetensors(path / "network.safetensors", "--resume", keys=lambda k: k.endswith(".alpha"))
        for value in alphas.values():
            if float(value) != asked:
                raise _mismatch(path, "--network_alpha", float(value), asked)


# ------------------------------------------------------------------------------------------------------------
# 3. checkpoints that do not fit the task
# ------------------------------------------------------------------------------------------------------------


def check_checkpoints(cfg: TrainConfig, net: MetaNetwork | None) -> None:
    from kandinsky5.model.loading import checkpoint_metadata

    warn_task_mismatch(cfg.dit_path, checkpoint_metadata(cfg.dit_path), cfg.task, "--dit")
    weights = cfg.network.weights
    if weights is None:
        return
    module = importlib.import_module(cfg.network.module)
    adapter = module.read_adapter(weights, "--network_weights")  # any format, official directories too
    warn_task_mismatch(weights, adapter.metadata, cfg.task, "--network_weights")
    if net is None:
        return
    sd = adapter.sd
    try:
        net.network.load_lora_state_dict(sd, strict=True)
    except (ValueError, RuntimeError) as exc:
        raise UserError(
            f"--network_weights {weights} does not fit this run's LoRA: {exc} (the same targets and rank are needed; "
            f"was it trained for another task?)"
        ) from None


# ------------------------------------------------------------------------------------------------------------
# 4. room for the outputs
# ------------------------------------------------------------------------------------------------------------


def _kept(total: int, every: int | None, last_n: int | None) -> int:
    if not every:
        return 0
    count = max(0, (total - 1) // every)  # no intermediate save at the last step
    return min(count, last_n + 1) if last_n else count  # +1: the new file exists before the oldest is rotated out


def estimate_output_bytes(cfg: TrainConfig, lora_bytes: int, total_steps: int, steps_per_epoch: int) -> int:
    """Bytes the run's checkpoints occupy at most: LoRA files kept, plus their states (--save_state, rotated by
    --save_last_n_*_state, or only the last one with --save_state_on_train_end)."""
    s = cfg.save
    epochs = -(-total_steps // max(1, steps_per_epoch))

    def count(state: bool) -> int:
        return _kept(total_steps, s.every_n_steps, s.kept("step", state)) + _kept(
            epochs, s.every_n_epochs, s.kept("epoch", state)
        )

    factor = _OPTIMIZER_STATE_FACTOR.get(optimizer_class(cfg.optimizer.type)[0].__name__, 2.0)
    states = 1 + count(True) if s.save_state else int(s.state_on_train_end)
    return int((1 + count(False)) * lora_bytes + states * (lora_bytes * (1 + factor) + (1 << 20)))


def _check_room(cfg: TrainConfig, lora_bytes: int, total_steps: int, steps_per_epoch: int) -> None:
    need = estimate_output_bytes(cfg, lora_bytes, total_steps, steps_per_epoch)
    check_output_dir(cfg.save.output_dir, "--output_dir", need, "lower --save_last_n_steps / --save_last_n_epochs")
    if cfg.tracking.logging_dir is not None:  # the default, <output_dir>/logs, is covered by the check above
        check_output_dir(cfg.tracking.logging_dir, "--logging_dir")


# ------------------------------------------------------------------------------------------------------------
# all of it
# ------------------------------------------------------------------------------------------------------------


def check_run(cfg: TrainConfig, ctx: DistContext, total_steps: int, steps_per_epoch: int) -> None:
    """Every check above, on rank 0; a failure stops every rank with the same line."""
    error = None
    if ctx.is_main:
        try:
            _check_all(cfg, ctx.world_size, total_steps, steps_per_epoch)
        except UserError as exc:
            error = str(exc)
    error = broadcast_object(ctx, error)
    if error is not None:
        raise UserError(error)


def _check_all(cfg: TrainConfig, world_size: int, total_steps: int, steps_per_epoch: int) -> None:
    check_earlier_run(cfg)
    net = _try_meta_network(cfg)
    if cfg.resume is not None:
        check_resume(cfg, world_size, net)
    check_checkpoints(cfg, net)
    _check_room(cfg, net.nbytes if net is not None else 0, total_steps, steps_per_epoch)
    clean_leftovers([cfg.save.output_dir, cfg.save.output_dir / "sample"])


def _try_meta_network(cfg: TrainConfig) -> MetaNetwork | None:
    """The meta LoRA, or None for a foreign --network_module that cannot be built on the meta device (its shape
    checks then happen when the real network is built)."""
    try:
        return meta_network(cfg)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any failure of foreign code on meta tensors only skips early checks
        log.debug("--network_module %s cannot be built on the meta device (%s)", cfg.network.module, exc)
        return None
