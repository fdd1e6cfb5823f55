"""``python -m kandinsky5.memory_plan``: the memory plan of a run, and the ``--blocks_to_swap auto`` choice, without
running it (no weights, no GPU needed)::

    python -m kandinsky5.memory_plan --task k5-pro-t2v-5s-sd --width 256 --height 256 --frames 17 \\
        --fp8_base --gradient_checkpointing --vram_budget_gb 24

The memory, attention, LoRA and optimizer flags mean what they mean for ``kandinsky5_train_network.py`` (same
defaults); ``--mode infer`` plans one sampling step of ``kandinsky5_generate_video.py`` instead (CFG batch of 2
unless the guidance is 1).  ``--dit`` reads a checkpoint's header for the exact stored dtypes; without it the
checkpoint is assumed to be ``--checkpoint_dtype`` (bf16).  ``--card_table`` prints the markdown table of
``docs/memory.md`` (24/32/48/80 GB cards, Pro and Lite, training and inference).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

import torch

from kandinsky5 import cli
from kandinsky5.common import UserError, parse_dtype, require_counts, run_cli
from kandinsky5.configs import TaskConfig, get_task
from kandinsky5.memory.activations import GIB, OPTIMIZERS, StepShape, Workload, optimizer_kind
from kandinsky5.memory.planner import Fit, Planner, RunPlan, device_budget, format_gib

__all__ = ["build_parser", "run_plan_from_args", "card_table", "main"]

CARDS_GB = (24, 32, 48, 80)
CARD_CONTEXT = GIB // 2  # what the CUDA context and the display take from a card before the allocator starts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kandinsky5.memory_plan", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)  # fmt: skip
    cli.add_model_args(p, vae=False, text=False)
    cli.add_attention_args(p)
    cli.add_memory_args(p, training=True)
    g = p.add_argument_group("the step to plan")
    g.add_argument("--mode", choices=("train", "infer"), default="train", help="a LoRA training step (default) or "
                   "one sampling step of the generator")  # fmt: skip
    g.add_argument("--width", type=int, default=None, help="pixel width (default: the task's)")
    g.add_argument("--height", type=int, default=None, help="pixel height (default: the task's)")
    g.add_argument("--frames", type=int, default=None, help="pixel frames, 4k+1 (default: the task's)")
    g.add_argument("--batch_size", type=int, default=1, help="training batch size (default 1)")
    g.add_argument("--text_tokens", type=int, default=None, help="text tokens (default: the task's maximum, 256)")
    g.add_argument("--guidance", type=float, default=None, help="infer: CFG weight; 1 = no uncond rows (task)")
    g.add_argument("--sample_width", type=int, default=None, help="train: also plan sampling at this width (off)")
    g.add_argument("--sample_height", type=int, default=None, help="train: sampling height (the --sample_width)")
    g.add_argument("--sample_frames", type=int, default=None, help="train: sampling frames (the task's)")
    g = p.add_argument_group("LoRA and optimizer (as the trainer)")
    g.add_argument("--network_dim", type=int, default=4, help="LoRA rank (default 4)")
    g.add_argument("--optimizer_type", default="AdamW", help="AdamW (default), AdamW8bit, Adafactor, or a class")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per step (default 1)")
    g.add_argument("--mixed_precision", choices=("bf16", "no"), default="bf16", help="bf16 (default) or no (fp32)")
    g.add_argument("--lora_mode", choices=("merge", "runtime"), default="merge",
                   help="infer: a LoRA merged into the weights (default) or kept as a runtime branch")  # fmt: skip
    g.add_argument("--checkpoint_dtype", default="bfloat16", help="without --dit: dtype of the checkpoint's "
                   "time/modulation weights, which keep it (default bfloat16; float32 for an fp32 file)")  # fmt: skip
    g.add_argument("--card_table", action="store_true", help="print the docs/memory.md card table and exit")
    cli.add_debug_arg(p)
    return p


_POSITIVE = ("width", "height", "frames", "batch_size", "text_tokens", "sample_width", "sample_height",
             "sample_frames", "network_dim", "gradient_accumulation_steps")  # fmt: skip


def _shape(task: TaskConfig, args, batch: int) -> StepShape:
    frames = task.frames if args.frames is None else args.frames
    shape = StepShape(batch, frames, task.height if args.height is None else args.height,
                      task.width if args.width is None else args.width,
                      args.text_tokens or task.text_max_length)  # fmt: skip
    _check_shape(shape, "--width/--height/--frames")
    return shape


def _check_shape(shape: StepShape, flags: str) -> None:
    try:
        shape.grid  # noqa: B018 -- validates the frame count
    except ValueError as exc:
        raise UserError(f"{flags}: {exc}") from None
    if shape.height % 16 or shape.width % 16 or min(shape.height, shape.width) < 16:
        raise UserError(f"{flags}: {shape.width}x{shape.height} must be positive multiples of 16 pixels")


def _sample_shapes(task: TaskConfig, args) -> tuple[StepShape, ...]:
    guidance = task.guidance if args.guidance is None else args.guidance
    batch = 2 if abs(guidance - 1.0) > 1e-6 else 1
    if args.mode == "infer":
        return (_shape(task, args, batch),)
    if args.sample_width is None:
        return ()
    shape = StepShape(batch, args.sample_frames or task.frames, args.sample_height or args.sample_width,
                      args.sample_width, task.text_max_length)  # fmt: skip
    _check_shape(shape, "--sample_width/--sample_height/--sample_frames")
    return (shape,)


def run_plan_from_args(args: argparse.Namespace) -> tuple[RunPlan, object]:
    """(RunPlan, MemoryConfig) from the flags."""
    from kandinsky5.memory.build import memory_config_from_args

    require_counts(args, _POSITIVE)  # 0 or less is a typo, not "the task's default" (None is)
    task = cli.task_from_args(args)
    attention = cli.attention_spec_from_args(args, task)
    memory = memory_config_from_args(args)
    if args.mode == "infer":
        memory = dataclasses.replace(memory, gradient_checkpointing=False, activation_cpu_offload=False)
    training = args.mode == "train"
    fp32 = args.mixed_precision == "no" if training else False
    work = Workload(lora_rank=args.network_dim, optimizer=optimizer_kind(args.optimizer_type),
                    attention="nabla" if attention.nabla else attention.backend, nabla=attention.nabla,
                    act_bytes=4 if fp32 else 2, runtime_lora=training or args.lora_mode == "runtime",
                    accumulation=args.gradient_accumulation_steps)  # fmt: skip
    header = _header(args.dit) if args.dit else None
    run = RunPlan(task, torch.float32 if fp32 else torch.bfloat16, work,
                  (_shape(task, args, args.batch_size),) if training else (), _sample_shapes(task, args), header,
                  None if header else parse_dtype(args.checkpoint_dtype))  # fmt: skip
    return run, memory


def _header(path: str) -> dict:
    from kandinsky5.model.loading import checkpoint_files, read_header

    return read_header(checkpoint_files(path))


def _describe(run: RunPlan, memory) -> str:
    w = run.work
    steps = [f"training {s.describe()}" for s in run.train_shapes]
    steps += [f"sampling {s.describe()} (CFG batch)" if s.batch == 2 else f"sampling {s.describe()}"
              for s in run.sample_shapes]  # fmt: skip
    lora = f"LoRA rank {w.lora_rank}, {OPTIMIZERS[w.optimizer]}" if run.training else "no LoRA training state"
    return f"{run.task.name}: {'; '.join(steps)}; {lora}; attention {w.attention}; {memory.describe()}"


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = cli.parse_args(build_parser(), argv)
    if args.card_table:
        print(card_table())
        return 0
    run, memory = run_plan_from_args(args)
    planner = Planner(run)
    budget, source = device_budget(torch.device("cuda" if torch.cuda.is_available() else "cpu"), args.vram_budget_gb)
    chosen = planner.evaluate(memory)
    print(f"memory plan for {_describe(run, memory)}" + (" (the plan below: --blocks_to_swap 0)" * memory.auto_swap))
    print(chosen.weights.table())
    print(chosen.table(budget))
    if budget is None:
        print("no budget: no CUDA device here and no --vram_budget_gb, so nothing is checked and auto is not chosen")
        return 0
    print(f"budget: {format_gib(budget)} ({source})")
    if chosen.peak > budget and not memory.auto_swap:
        print(f"does not fit: {planner.suggestion(memory, budget)}")
    _print_auto(planner, memory, budget)
    return 0


def _print_auto(planner: Planner, memory, budget: int) -> None:
    try:
        fit, reason = planner.auto(memory, budget)
    except UserError as exc:
        print(f"auto: {exc}")
        return
    print(f"auto choice: {fit.memory.describe()}")
    print(f"  why: {reason}")
    if memory.auto_swap:
        print(fit.table(budget))


# ----------------------------------------------------------------------------------------------------------------
# the docs/memory.md card table
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Row:
    label: str
    task: str
    train: StepShape | None
    sample: StepShape | None
    fp8: bool


_ROWS = (
    _Row("Pro, sampling 512x512x121 (CFG batch 2)", "k5-pro-t2v-5s-sd", None, StepShape(2, 121, 512, 512, 256), False),
    _Row(
        "Pro fp8, sampling 512x512x121 (CFG batch 2)", "k5-pro-t2v-5s-sd", None, StepShape(2, 121, 512, 512, 256), True
    ),  # fmt: skip
    _Row(
        "Pro fp8, sampling 1024x1024x121 NABLA (CFG batch 2)",
        "k5-pro-t2v-5s-hd",
        None,
        StepShape(2, 121, 1024, 1024, 256),
        True,
    ),  # fmt: skip
    _Row("Pro fp8, training 256x256x17", "k5-pro-t2v-5s-sd", StepShape(1, 17, 256, 256, 256), None, True),
    _Row("Pro fp8, training 512x512x121", "k5-pro-t2v-5s-sd", StepShape(1, 121, 512, 512, 256), None, True),
    _Row(
        "Lite, sampling 512x512x121 (CFG batch 2)", "k5-lite-t2v-5s-sd", None, StepShape(2, 121, 512, 512, 256), False
    ),  # fmt: skip
    _Row("Lite, training 512x512x121", "k5-lite-t2v-5s-sd", StepShape(1, 121, 512, 512, 256), None, False),
    _Row("Lite, training 512x512x241 NABLA", "k5-lite-t2v-10s-sd", StepShape(1, 241, 512, 512, 256), None, False),
)


def _row_planner(row: _Row) -> tuple[Planner, object]:
    from kandinsky5.memory.build import MemoryConfig

    task = get_task(row.task)
    attention = "nabla" if task.nabla else "sdpa"
    work = Workload(lora_rank=32, attention=attention, nabla=task.nabla, runtime_lora=row.train is not None)
    run = RunPlan(task, torch.bfloat16, work, (row.train,) if row.train else (), (row.sample,) if row.sample else (),
                  checkpoint_dtype=torch.bfloat16)  # fmt: skip
    return Planner(run), MemoryConfig(fp8=row.fp8)


def _cell(planner: Planner, memory, budget: int) -> str:
    try:
        fit, _ = planner.auto(memory, budget)
    except UserError:
        frugal = planner._levels(memory)[-1][0]
        peak = planner.evaluate(dataclasses.replace(frugal, blocks_to_swap=planner.max_swap())).peak
        return f"does not fit (min {peak / GIB:.1f} GiB)"
    return _switches(fit) + f" ({fit.peak / GIB:.1f} GiB)"


def _switches(fit: Fit) -> str:
    m = fit.memory
    parts = [f"swap {m.blocks_to_swap}" if m.blocks_to_swap else "no swap"]
    parts += ["ckpt"] if m.gradient_checkpointing else []
    parts += ["offload"] if m.activation_cpu_offload else []
    return " + ".join(parts)


def card_table() -> str:
    """Markdown: the ``auto`` choice and its predicted peak per card (card GiB minus :data:`CARD_CONTEXT`)."""
    head = "| run (bf16 checkpoint, LoRA rank 32, AdamW) | " + " | ".join(f"{c} GB" for c in CARDS_GB) + " |"
    lines = [head, "|---|" + "---|" * len(CARDS_GB)]
    for row in _ROWS:
        planner, memory = _row_planner(row)
        cells = [_cell(planner, memory, c * GIB - CARD_CONTEXT) for c in CARDS_GB]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
