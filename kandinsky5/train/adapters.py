"""Trainer side of adapter files: the musubi-compatible flags about LoRA files and metadata, merging
``--base_weights`` into the DiT, building the network (``--network_weights`` / ``--dim_from_weights``) and the
metadata each saved file carries.

The network module (``--network_module``, e.g. ``networks.lora_kandinsky``) is used duck-typed -- this package
never imports ``networks`` -- through ``create_network``, ``create_network_from_weights``, ``read_adapter``,
``save_lora`` and ``training_metadata``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from kandinsky5.common import UserError, get_logger
from kandinsky5.train.config import MetadataConfig, TrainConfig

if TYPE_CHECKING:
    from kandinsky5.train.run import Run

__all__ = ["add_adapter_file_args", "metadata_config_from_args", "save_dtype_from_args", "build_network",
           "file_metadata", "MINIMUM_KEYS"]  # fmt: skip

log = get_logger(__name__)

SAVE_PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MINIMUM_KEYS = ("ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")


def add_adapter_file_args(p: argparse.ArgumentParser) -> None:
    """musubi's flags about the network files and their metadata (same names and meanings)."""
    g = p.add_argument_group("adapter files and metadata (musubi-compatible)")
    g.add_argument("--dim_from_weights", action="store_true",
                   help="build the network from --network_weights (modules, kind, rank, alpha) instead of "
                   "--network_dim/--network_args (default: off)")  # fmt: skip
    g.add_argument(
        "--base_weights",
        nargs="*",
        default=None,
        help="adapter files merged into the DiT before training, any supported format (default: none)",
    )
    g.add_argument(
        "--base_weights_multiplier",
        nargs="*",
        type=float,
        default=None,
        help="one multiplier per --base_weights file (default 1.0)",
    )
    g.add_argument(
        "--save_precision",
        choices=tuple(SAVE_PRECISIONS),
        default=None,
        help="dtype of the saved weights (default: fp32, the training precision; alpha stays fp32)",
    )
    g.add_argument("--trigger_word", default=None,
                   help="stored as the 'trigger' metadata, which the official pipeline and our generator prepend "
                   "to prompts (default: none)")  # fmt: skip
    g.add_argument(
        "--no_metadata",
        action="store_true",
        help="save only the minimum kohya keys, modelspec and the trigger word (default: full metadata)",
    )
    g.add_argument("--training_comment", default=None, help="comment stored as ss_training_comment (default: none)")
    helps = {
        "title": "modelspec.title (default: --output_name)",
        "author": "modelspec.author (default: none)",
        "description": "modelspec.description (default: none)",
        "license": "modelspec.license (default: none)",
        "tags": "modelspec.tags, comma-separated (default: none)",
        "reso": "modelspec.resolution as 'W,H' (default: the task's resolution)",
        "arch": "modelspec.architecture (default: Kandinsky-5/lora, or Kandinsky-5/lycoris for LoHa/LoKr)",
    }
    for key, text in helps.items():
        g.add_argument(f"--metadata_{key}", default=None, help=text)
    g.add_argument(
        "--metadata_full_paths",
        action="store_true",
        help="store absolute dataset paths in ss_datasets (default: directory names only)",
    )


def metadata_config_from_args(args: argparse.Namespace) -> MetadataConfig:
    if args.metadata_reso is not None:
        parts = args.metadata_reso.replace("x", ",").split(",")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise UserError(f"--metadata_reso {args.metadata_reso!r}: write W,H (e.g. 768,512) or one number")
    return MetadataConfig(
        enabled=not args.no_metadata, trigger_word=args.trigger_word or None, training_comment=args.training_comment,
        title=args.metadata_title, author=args.metadata_author, description=args.metadata_description,
        license=args.metadata_license, tags=args.metadata_tags, resolution=args.metadata_reso,
        architecture=args.metadata_arch, full_paths=args.metadata_full_paths,
    )  # fmt: skip


def save_dtype_from_args(args: argparse.Namespace) -> torch.dtype | None:
    return SAVE_PRECISIONS[args.save_precision] if args.save_precision else None


def check_adapter_file_args(args: argparse.Namespace) -> tuple[tuple[Path, ...], tuple[float, ...]]:
    """Validate the file flags before any model loads -> (base weight paths, one multiplier each)."""
    if args.dim_from_weights and not args.network_weights:
        raise UserError("--dim_from_weights builds the network from --network_weights; give --network_weights")
    if args.dim_from_weights and args.network_args:
        raise UserError("--network_args are not used with --dim_from_weights (targets and ranks come from the file)")
    if args.save_format == "diffusers" and args.network_module in (
        "networks.loha_kandinsky",
        "networks.lokr_kandinsky",
    ):
        raise UserError(f"--save_format diffusers holds LoRA only; {args.network_module} saves comfyui or musubi")
    paths = tuple(Path(p) for p in args.base_weights or ())
    mults = list(args.base_weights_multiplier or ())
    if len(mults) > len(paths):
        raise UserError(f"{len(mults)} --base_weights_multiplier values for {len(paths)} --base_weights files")
    for path in (*paths, *([Path(args.network_weights)] if args.network_weights else [])):
        if not path.exists():
            raise UserError(f"adapter file {path} does not exist (--base_weights / --network_weights)")
    return paths, tuple(mults + [1.0] * (len(paths) - len(mults)))


# ----------------------------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------------------------


def _read(module: ModuleType, path: Path, flag: str):
    try:
        return module.read_adapter(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{flag} {path}: {exc}") from None


def _from_file(module: ModuleType, adapter, dit, multiplier: float, inference: bool, flag: str):
    try:
        return module.create_network_from_weights(multiplier, adapter.sd, dit, inference, adapter.metadata,
                                                  adapter.origins)  # fmt: skip
    except ValueError as exc:
        raise UserError(f"{flag} {adapter.weights_path} does not fit the DiT: {exc}") from None


def merge_base_weights(cfg: TrainConfig, dit, module: ModuleType) -> None:
    """``--base_weights``: every file is read and checked against the DiT, then all are merged (fp8-aware)."""
    n = cfg.network
    nets = [_from_file(module, _read(module, p, "--base_weights"), dit, m, True, "--base_weights")
            for p, m in zip(n.base_weights, n.base_multipliers)]  # fmt: skip
    for path, mult, net in zip(n.base_weights, n.base_multipliers, nets):
        net.merge_into(dit)
        log.info("merged --base_weights %s (multiplier %s) into the DiT: %s", path, mult, net.summary())


def network_from_file(module: ModuleType, path: Path, dit) -> torch.nn.Module:
    """``--dim_from_weights``: a trainable network holding every module of the ``--network_weights`` file."""
    return _from_file(module, _read(module, path, "--network_weights"), dit, 1.0, False, "--network_weights")


def new_network(cfg: TrainConfig, module: ModuleType, dit) -> torch.nn.Module:
    """The network's modules for ``dit``, not applied: from ``--network_module`` and ``--network_args``, or every
    module, kind and shape of ``--network_weights`` with ``--dim_from_weights`` (its weights too).  The FSDP engine
    builds its unsharded saving copy with this as well, so that copy has the trained network's shapes."""
    from kandinsky5.train import prechecks

    n = cfg.network
    if not n.dim_from_weights:
        return prechecks.create_network(module, n, dit)
    network = network_from_file(module, n.weights, dit)
    for adapter in network.lora_modules:
        adapter.dropout = n.dropout or 0.0
    return network


def meta_network(cfg: TrainConfig, module: ModuleType) -> torch.nn.Module:
    """:func:`new_network` on a weightless (meta) DiT, for checks and plans before loading; with
    ``--dim_from_weights`` the file's tensors stay on the CPU (its alphas are read as numbers)."""
    from kandinsky5.model.dit import DiT

    with torch.device("meta"):
        dit = DiT(cfg.task.dit)
        if not cfg.network.dim_from_weights:
            return new_network(cfg, module, dit)
    return new_network(cfg, module, dit)


def build_network(cfg: TrainConfig, dit) -> tuple[torch.nn.Module, ModuleType]:
    """Import --network_module, merge --base_weights, create (or load) the network and apply it to ``dit``."""
    from kandinsky5.train import prechecks

    n = cfg.network
    module = prechecks.import_network_module(n.module)
    merge_base_weights(cfg, dit, module)
    network = new_network(cfg, module, dit)
    if n.dim_from_weights:
        log.info("network built from %s (--dim_from_weights)", n.weights)
    elif n.weights is not None:
        adapter = _read(module, n.weights, "--network_weights")
        try:
            network.load_lora_state_dict(adapter.sd, strict=True)
        except ValueError as exc:
            raise UserError(f"--network_weights {n.weights}: {exc} (same targets, kind and rank needed; "
                            "--dim_from_weights takes them from the file)") from None  # fmt: skip
        log.info("network initialised from %s", n.weights)
    kinds = sorted({getattr(m, "kind", "lora") for m in network.lora_modules} - {"lora"})
    if cfg.save.format == "diffusers" and kinds:
        raise UserError(f"--save_format diffusers holds LoRA only, this network has {kinds}; use comfyui or musubi")
    network.apply_to(dit)
    network.train()
    log.info("%s", network.summary())
    return network, module


# ----------------------------------------------------------------------------------------------------------------
# metadata of the saved files
# ----------------------------------------------------------------------------------------------------------------


def file_metadata(run: Run, full: dict[str, object]) -> dict[str, object]:
    """The header of a saved file: ``full`` (``lora_metadata``) + modelspec + trigger, or the minimum of it."""
    md, cfg = run.cfg.metadata, run.cfg
    kinds = {getattr(m, "kind", "lora") for m in run.network.lora_modules}
    extra: dict[str, object] = run.module.modelspec_metadata(
        md.title or cfg.save.output_name, time.time(), _resolution(md.resolution, cfg.task.width, cfg.task.height),
        "lora" if kinds <= {"lora", "diff"} else "lycoris", _timestep_range(cfg), author=md.author,
        description=md.description, license=md.license, tags=md.tags, architecture=md.architecture,
    )  # fmt: skip
    if md.trigger_word:
        extra["trigger"] = md.trigger_word
    if not md.enabled:
        full = {k: v for k, v in full.items() if k in MINIMUM_KEYS}
    else:
        full = {**full, "ss_training_comment": md.training_comment or "None", "ss_datasets": run.datasets or []}
        if run.base_sha256:
            full.update(k5_base_checkpoint_sha256=run.base_sha256, ss_new_sd_model_hash=run.base_sha256)
        if cfg.network.base_weights:
            full["k5_base_weights"] = {
                p.name: m for p, m in zip(cfg.network.base_weights, cfg.network.base_multipliers)
            }
    return {**full, **extra}


def _resolution(text: str | None, width: int, height: int) -> tuple[int, int]:
    if not text:
        return width, height
    parts = [int(p) for p in text.replace("x", ",").split(",")]
    return (parts[0], parts[-1])


def _timestep_range(cfg: TrainConfig) -> tuple[float, float] | None:
    t = asdict(cfg.timesteps)
    lo, hi = t.get("min_timestep", 0.0), t.get("max_timestep", 1000.0)
    return None if (lo, hi) == (0.0, 1000.0) else (lo, hi)
