"""Shared command-line flag groups, ``--config_file`` TOML merging and the error-reporting entry wrapper.

The four scripts build their parsers from these groups so that a flag means the same thing everywhere:

* :func:`add_model_args` — ``--task``, ``--dit``, ``--vae``, ``--text_encoder_qwen``, ``--text_encoder_clip``;
* :func:`add_attention_args` — ``--sdpa | --flash_attn | --flash3 | --sage_attn | --xformers`` and the NABLA group;
* :func:`add_memory_args` — ``--fp8_base``, ``--fp8_scaled``, ``--fp8_fast``, ``--blocks_to_swap``, ...;
* :func:`add_magcache_args` — ``--magcache`` and its knobs (generation and sampling during training);
* :func:`add_compile_args` — ``--compile`` and musubi's ``--compile_backend/mode/dynamic/fullgraph/cache_size_limit``;

:func:`parse_args` reads an optional TOML file (``--config_file``) whose keys must be flag names (unknown keys are an
error listing the close matches); the command line wins over the file; ``--config_file run`` also finds
``run.toml`` (as musubi).  It then refuses musubi flags that are not offered (:mod:`kandinsky5.musubi_compat`).
:class:`HelpFormatter` shows every flag's default in ``--help``.  :func:`run_main` turns a
:class:`~kandinsky5.common.UserError` into one line on stderr and exit status 1; :func:`add_debug_arg` adds
``--debug``, which prints the full traceback as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from collections.abc import Callable, Sequence
from pathlib import Path

from kandinsky5.common import DEBUG_FLAG, UserError, get_logger, run_cli
from kandinsky5.configs import NablaConfig, TaskConfig, get_task, task_names
from kandinsky5.model.attention import backend_from_flags, check_backend_dtype, resolve_backend
from kandinsky5.musubi_compat import check_args

__all__ = [
    "add_model_args",
    "add_attention_args",
    "add_memory_args",
    "add_compile_args",
    "add_magcache_args",
    "add_config_file_arg",
    "HelpFormatter",
    "add_debug_arg",
    "parse_args",
    "task_from_args",
    "attention_spec_from_args",
    "run_main",
]

log = get_logger(__name__)

_BACKEND_FLAGS = ("sdpa", "flash_attn", "flash3", "sage_attn", "xformers")


def add_model_args(parser: argparse.ArgumentParser, dit: bool = True, vae: bool = True, text: bool = True) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--task",
        default=None,
        help=f"model configuration (architecture, attention, defaults); one of: {', '.join(task_names())}",
    )
    if dit:
        g.add_argument("--dit", default=None, help="DiT checkpoint: official .safetensors file (or a dir of shards)")
    if vae:
        g.add_argument(
            "--vae",
            default=None,
            help="HunyuanVideo VAE: diffusion_pytorch_model.safetensors, its diffusers directory, or pytorch_model.pt",
        )
    if text:
        g.add_argument(
            "--text_encoder_qwen",
            default=None,
            help="Qwen2.5-VL-7B-Instruct: hub model id (e.g. Qwen/Qwen2.5-VL-7B-Instruct) or local snapshot dir",
        )
        g.add_argument(
            "--text_encoder_clip",
            default=None,
            help="CLIP ViT-L/14 text model: hub id (openai/clip-vit-large-patch14) or local snapshot dir",
        )


def add_attention_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "attention (choose at most one backend; default auto: FlashAttention 3/2 for bf16/fp16 on a GPU when "
        "installed, else SDPA's exact fused kernels; SDPA on the CPU; the choice is logged)"
    )
    g.add_argument("--sdpa", action="store_true", help="PyTorch scaled_dot_product_attention, its own kernel choice")
    g.add_argument("--flash_attn", action="store_true", help="FlashAttention 2 for visual self-attention")
    g.add_argument("--flash3", action="store_true", help="FlashAttention 3 (Hopper) for visual self-attention")
    g.add_argument("--sage_attn", action="store_true", help="SageAttention (int8 q/k; not bit-faithful)")
    g.add_argument("--xformers", action="store_true", help="xformers memory-efficient attention")
    n = parser.add_argument_group("NABLA sparse attention (task default unless forced)")
    n.add_argument(
        "--force_nabla_attention", action="store_true", help="use NABLA even if the task defaults to dense attention"
    )
    n.add_argument("--nabla_method", choices=("topcdf", "topk"), default=None,
                   help="block selection (default: task's or topcdf)")  # fmt: skip
    n.add_argument("--nabla_P", type=float, default=None, help="CDF threshold / kept fraction (default: task's or 0.9)")
    n.add_argument("--nabla_wT", type=int, default=None, help="STA window, latent frames (default: task's or 11)")
    n.add_argument("--nabla_wH", type=int, default=None, help="STA window, 8x8-token tiles, height (default 3)")
    n.add_argument("--nabla_wW", type=int, default=None, help="STA window, 8x8-token tiles, width (default 3)")
    _add_on_off(
        n, "--nabla_add_sta", "--no_nabla_add_sta",
        "OR the sliding-tile (STA) prior into the NABLA mask (default)",
        "use only the dynamic NABLA mask, without the STA prior",
    )  # fmt: skip


def _add_on_off(group, on: str, off: str, on_help: str, off_help: str) -> None:
    """Two exclusive switches writing True / False to ``on``'s dest (None when neither is given)."""
    pair = group.add_mutually_exclusive_group()
    dest = on.removeprefix("--")
    pair.add_argument(on, dest=dest, action="store_true", default=None, help=on_help)
    pair.add_argument(off, dest=dest, action="store_false", help=off_help)


def add_memory_args(parser: argparse.ArgumentParser, training: bool = False) -> None:
    g = parser.add_argument_group("memory")
    g.add_argument("--fp8_base", action="store_true", help="store the DiT's large linear weights in fp8 (e4m3)")
    g.add_argument("--fp8_scaled", action="store_true", help="accepted for musubi compatibility; fp8 is always scaled")
    g.add_argument("--fp8_fast", action="store_true", help="with --fp8_base: fp8 scaled matmul on GPUs that have it")
    g.add_argument(
        "--blocks_to_swap",
        type=swap_count,
        default=0,
        help="transformer blocks kept in CPU memory and streamed (default 0); 'auto': the smallest count whose "
        "predicted peak fits --vram_budget_gb (training: turning on checkpointing, then its offload, if needed)",
    )
    g.add_argument(
        "--vram_budget_gb",
        type=float,
        default=None,
        help="GPU memory the start-up plan may use, in GiB (a '24 GB' card has 24 GiB); default: the device's "
        "free memory minus 0.25 GiB; required by --blocks_to_swap auto without CUDA",
    )
    _add_on_off(
        g, "--use_pinned_memory_for_block_swap", "--no_pinned_memory_for_block_swap",
        "pin the swapped blocks' CPU memory so copies overlap compute (default: on when CUDA is present)",
        "keep the swapped blocks in pageable CPU memory (locks no host RAM; copies no longer overlap compute)",
    )  # fmt: skip
    g.add_argument(
        "--offload_dit_during_sampling",
        action="store_true",
        help="move the DiT to CPU while the text encoders and the VAE run",
    )
    if training:
        g.add_argument("--gradient_checkpointing", action="store_true", help="recompute block activations in backward")
        g.add_argument(
            "--gradient_checkpointing_cpu_offload",
            action="store_true",
            help="with --gradient_checkpointing: keep the saved block inputs in CPU memory",
        )


def add_compile_args(parser: argparse.ArgumentParser) -> None:
    """musubi's torch.compile flags (same names and meanings); see ``kandinsky5.memory.compile``."""
    g = parser.add_argument_group("torch.compile (per DiT block; see docs/performance.md)")
    g.add_argument("--compile", action="store_true", help="torch.compile each text/visual DiT block (off)")
    g.add_argument("--compile_backend", default="inductor", help="torch.compile backend (default: inductor)")
    g.add_argument(
        "--compile_mode",
        default="default",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="inductor mode (default: default); modes with CUDA graphs cannot be combined with --blocks_to_swap",
    )
    g.add_argument(
        "--compile_dynamic",
        default=None,
        choices=("true", "false", "auto"),
        help="dynamic shapes: auto (default) compiles the first shape, then once more with symbolic sizes",
    )
    g.add_argument("--compile_fullgraph", action="store_true", help="fail on any graph break inside a block (off)")
    g.add_argument(
        "--compile_cache_size_limit",
        type=int,
        default=None,
        help="torch._dynamo.config.cache_size_limit: compiled variants kept per block kind (default: torch's, 8)",
    )


def add_magcache_args(parser: argparse.ArgumentParser, calibrate: bool = True) -> None:
    """MagCache step skipping (``kandinsky5/sampling/magcache.py``); defaults are the official ones."""
    g = parser.add_argument_group("MagCache step skipping (see docs/inference.md)")
    g.add_argument(
        "--magcache",
        action="store_true",
        help="skip the DiT's visual blocks on steps whose residual is predictable (official MagCache with the "
        "task's official ratios, or --magcache_ratios); default off",
    )
    g.add_argument(
        "--magcache_thresh",
        type=float,
        default=None,
        help="accumulated-error threshold; higher skips more (default 0.12, official; 0 = never skip)",
    )
    g.add_argument(
        "--magcache_K",
        type=int,
        default=None,
        help="at most K consecutive skipped steps per CFG stream (default 2, official)",
    )
    g.add_argument(
        "--magcache_retention_ratio",
        type=float,
        default=None,
        help="share of the first steps that always run (default 0.2, official)",
    )
    g.add_argument("--magcache_ratios", default=None, metavar="FILE",
                   help="ratios JSON written by --magcache_calibrate instead of the task's official ones "
                   "(implies --magcache; default: official ratios)")  # fmt: skip
    if calibrate:
        g.add_argument("--magcache_calibrate", default=None, metavar="FILE",
                       help="run every step, measure this model's MagCache ratios and write them to FILE (JSON with "
                       "task, checkpoint hash, steps) for --magcache_ratios; default off")  # fmt: skip


def swap_count(value: str) -> int | str:
    """``--blocks_to_swap`` value: a block count or ``auto``."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of blocks or 'auto', got {value!r}") from None


def add_config_file_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config_file", default=None, help="TOML file whose keys are flag names (without --); the command line wins"
    )


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` with every flag's default: appended as ``(default: ...)`` unless the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        return f"{text} (default: {_default_text(action.default)})"


def _default_text(value: object) -> str:
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace("%", "%%")


def config_file_path(path: str) -> Path:
    """``--config_file run`` finds ``run.toml`` (as musubi) when ``run`` itself does not exist."""
    file = Path(path)
    if not file.exists() and file.suffix != ".toml" and file.with_name(file.name + ".toml").exists():
        return file.with_name(file.name + ".toml")
    return file


def _apply_config_file(parser: argparse.ArgumentParser, path: str) -> None:
    import toml

    file = config_file_path(path)
    if not file.exists():
        raise UserError(f"--config_file {path} does not exist (nor {path}.toml)")
    try:
        values = toml.load(file)
    except toml.TomlDecodeError as exc:
        raise UserError(f"--config_file {file} is not valid TOML: {exc}") from None
    flat = {}
    for key, value in values.items():
        flat.update(value if isinstance(value, dict) else {key: value})  # [sections] are only for grouping
    dests = {a.dest for a in parser._actions}
    for key in flat:
        if key not in dests:
            close = difflib.get_close_matches(key, dests, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"unknown key {key!r} in --config_file {file}{hint}")
    parser.set_defaults(**flat)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; with ``--config_file`` the file's values become defaults that the command line overrides."""
    pre, _ = parser.parse_known_args(argv)
    if getattr(pre, "config_file", None):
        _apply_config_file(parser, pre.config_file)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def task_from_args(args: argparse.Namespace) -> TaskConfig:
    if not args.task:
        raise UserError(f"--task is required; choose one of: {', '.join(task_names())}")
    try:
        return get_task(args.task)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def nabla_from_args(args: argparse.Namespace, task: TaskConfig) -> NablaConfig | None:
    """The task's NABLA setting (or a forced default one) with any explicit --nabla_* flag applied."""
    base = task.nabla
    if base is None and not args.force_nabla_attention:
        given = [f for f in ("nabla_method", "nabla_P", "nabla_wT", "nabla_wH", "nabla_wW") if getattr(args, f)]
        if given:
            raise UserError(
                f"--{given[0]} has no effect: task {task.name} uses dense attention; add --force_nabla_attention"
            )
        return None
    base = base or NablaConfig()
    fields = {"method": "nabla_method", "P": "nabla_P", "wT": "nabla_wT", "wH": "nabla_wH", "wW": "nabla_wW"}
    changes = {f: getattr(args, a) for f, a in fields.items() if getattr(args, a) is not None}
    if args.nabla_add_sta is not None:
        changes["add_sta"] = args.nabla_add_sta
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def attention_spec_from_args(args: argparse.Namespace, task: TaskConfig, precision: tuple | None = None):
    """Resolve the attention flags into a :class:`kandinsky5.model.dit.AttentionSpec` (imports happen here, once).

    ``precision`` = (compute dtype, the flag that chose it), e.g. ``(torch.float32, "--mixed_precision no")``: a
    dense backend without kernels for that dtype is refused now, before any model loads (NABLA runs instead of the
    dense backend, so it is not checked then).
    """
    from kandinsky5.model.dit import AttentionSpec

    backend = backend_from_flags(**{f: bool(getattr(args, f, False)) for f in _BACKEND_FLAGS})
    nabla = nabla_from_args(args, task)
    if precision is not None and nabla is None:
        check_backend_dtype(backend, *precision)
    resolve_backend(backend, log_choice=nabla is None)  # import the kernel now: a missing package fails here
    if nabla is not None:
        log.info(
            "attention: NABLA for visual self-attention (%s, P=%s, STA %s, windows %d/%d/%d)",
            nabla.method, nabla.P, "on" if nabla.add_sta else "off", nabla.wT, nabla.wH, nabla.wW,
        )  # fmt: skip
    return AttentionSpec(backend=backend, nabla=nabla)


def add_debug_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        DEBUG_FLAG,
        action="store_true",
        help="on an error also print the full Python traceback (default: one 'error: ...' line)",
    )


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; a UserError becomes ``error: <message>`` on stderr and exit status 1 (``--debug``: with
    the traceback).  See ``kandinsky5.common.run_cli``."""
    return run_cli(main, argv)
