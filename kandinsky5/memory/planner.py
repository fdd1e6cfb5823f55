"""The start-up memory plan: weights + activations against the device budget, the fit check, ``--blocks_to_swap auto``.

Role: :class:`Planner` evaluates a :class:`~kandinsky5.memory.build.MemoryConfig` for a run -- the exact weight
bytes of ``kandinsky5.memory_plan`` on the meta model plus the analytic step model of
``kandinsky5.memory.activations`` -- for every training bucket and every sampling call of the run, and reports the
worst one.  Nothing is loaded: the trainer and the generator call :func:`check_memory` before any weight is read.

Budget (:func:`device_budget`): ``--vram_budget_gb X`` (X GiB, how cards are sized: a "24 GB" card has 24 GiB),
else the CUDA device's free memory (read after the CUDA context exists) minus :data:`FREE_RESERVE`.  Without CUDA
there is no budget to read: the plan is printed as a "CPU run", nothing is checked, and ``auto`` needs
``--vram_budget_gb``.

``--blocks_to_swap auto`` (:meth:`Planner.auto`): the user's switches are kept; if a swap count fits, the smallest
one is taken (the peak falls by one block per swapped block, so a bisection finds it); otherwise, in training,
gradient checkpointing is turned on, then its CPU activation offload, each time with the smallest count that
fits.  When nothing fits the error names what was tried and the peak of the most frugal setting.

Not fitting without ``auto`` is an error before loading, naming the smallest change found in the same order
(:meth:`Planner.suggestion`), and that a larger ``--vram_budget_gb`` runs anyway.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kandinsky5.common import UserError, get_logger
from kandinsky5.configs import TaskConfig
from kandinsky5.memory.activations import GIB, Estimate, StepShape, Workload, sampling_estimate, training_estimate
from kandinsky5.memory_plan import MemoryPlan, max_blocks_to_swap, memory_plan, sharded_plan, stored_dtypes

__all__ = ["FREE_RESERVE", "RunPlan", "Fit", "Planner", "device_budget", "check_memory", "format_gib"]

log = get_logger(__name__)

FREE_RESERVE = GIB // 4  # left free under the default budget (other processes, the context growing)


def format_gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB"


@dataclass(frozen=True)
class RunPlan:
    """What a run computes: the training buckets and the sampling calls (CFG batch) at their shapes."""

    task: TaskConfig
    dtype: torch.dtype  # DiT weight dtype
    work: Workload
    train_shapes: tuple[StepShape, ...] = ()
    sample_shapes: tuple[StepShape, ...] = ()
    header: dict | None = None  # checkpoint header (read_header format): stored dtypes, pre-quantised layers
    checkpoint_dtype: torch.dtype | None = None  # without a header: the dtype the checkpoint is assumed to have
    fsdp_world: int = 0  # --fsdp over this many ranks: sharded weights (memory_plan.sharded_plan), no block swap

    @property
    def training(self) -> bool:
        return bool(self.train_shapes)


@dataclass(frozen=True)
class Fit:
    """One evaluated configuration: the worst training and sampling estimates and the overall peak."""

    memory: object  # MemoryConfig
    weights: MemoryPlan
    train: Estimate | None
    sample: Estimate | None

    @property
    def peak(self) -> int:
        return max(e.peak for e in (self.train, self.sample) if e is not None)

    def table(self, budget: int | None) -> str:
        parts = [e.table(budget) for e in (self.train, self.sample) if e is not None]
        return "\n".join(parts)


class Planner:
    """Evaluates memory configurations of one :class:`RunPlan` (weight plans cached per fp8 / swap count)."""

    def __init__(self, run: RunPlan):
        self.run = run
        self._metas: dict[tuple[bool, bool], object] = {}
        self._plans: dict[tuple[bool, bool, int], MemoryPlan] = {}
        header = run.header or {}
        self.stored = stored_dtypes(header) if header else self._assumed_stored()

    def _assumed_stored(self) -> dict:
        if self.run.checkpoint_dtype is None:
            return {}
        return {k: self.run.checkpoint_dtype for k in self._meta(False, False).state_dict()}

    def _meta(self, fp8_on: bool, fast: bool):
        """The meta DiT as ``build_dit`` converts it (policy fp8 layers, or the file's pre-quantised ones)."""
        if (fp8_on, fast) not in self._metas:
            from kandinsky5.memory import build
            from kandinsky5.memory.fp8 import convert_to_fp8
            from kandinsky5.model.dit import DiT

            with torch.device("meta"):
                meta = DiT(self.run.task.dit)
            switches = build.MemoryConfig(fp8=fp8_on, fp8_fast=fast)
            prequant, quantize = build._fp8_layout(meta, switches, self.run.header or {})
            if prequant or quantize:
                convert_to_fp8(meta, fast=fast, targets=[*prequant, *sorted(quantize)], scale_shapes=prequant)
            self._metas[(fp8_on, fast)] = meta
        return self._metas[(fp8_on, fast)]

    def weights(self, fp8_on: bool, fast: bool, swap: int) -> MemoryPlan:
        """Exact weight bytes (``memory_plan``; per rank under ``--fsdp``) for these switches, cached."""
        key = (fp8_on, fast, swap)
        if key not in self._plans:
            meta, dtype = self._meta(fp8_on, fast), self.run.dtype
            plan = memory_plan(meta, dtype, swap, stored=self.stored)
            if self.run.fsdp_world > 1:  # one rank's shards + the gathered root and blocks, as resident bytes
                peak = sharded_plan(meta, dtype, self.run.fsdp_world, stored=self.stored).peak
                plan = dataclasses.replace(plan, gpu_fp8=0, gpu_hp=peak, gpu_staging=0, cpu_swapped=0, streamed=0)
            self._plans[key] = plan
        return self._plans[key]

    def max_swap(self) -> int:
        """The largest ``--blocks_to_swap`` (0 under ``--fsdp``, which refuses block swap)."""
        return 0 if self.run.fsdp_world > 1 else max_blocks_to_swap(self._meta(False, False))

    def evaluate(self, memory) -> Fit:
        """Worst training bucket and worst sampling call for ``memory`` (a resolved MemoryConfig)."""
        run, cfg = self.run, self.run.task.dit
        plan = self.weights(memory.fp8, memory.fp8_fast, memory.blocks_to_swap)
        train = [training_estimate(cfg, s, memory, plan, run.work) for s in run.train_shapes]
        sample = [sampling_estimate(cfg, s, memory, plan, run.work, lora_state=run.training) for s in run.sample_shapes]
        worst = [max(e, key=lambda x: x.peak) if e else None for e in (train, sample)]
        return Fit(memory, plan, *worst)

    def smallest_fit(self, memory, budget: int) -> Fit | None:
        """The smallest ``blocks_to_swap`` (others as in ``memory``) whose peak fits ``budget``, or None."""
        lo, hi = 0, self.max_swap()
        top = self.evaluate(dataclasses.replace(memory, blocks_to_swap=hi))
        if top.peak > budget:
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            if self.evaluate(dataclasses.replace(memory, blocks_to_swap=mid)).peak <= budget:
                hi = mid
            else:
                lo = mid + 1
        return self.evaluate(dataclasses.replace(memory, blocks_to_swap=lo))

    def _levels(self, memory) -> list[tuple[object, str]]:
        """The switch settings ``auto`` tries, cheapest first: the user's, + checkpointing, + activation offload."""
        levels = [(dataclasses.replace(memory, auto_swap=False), "")]
        if self.run.training and not memory.gradient_checkpointing:
            levels.append((dataclasses.replace(levels[-1][0], gradient_checkpointing=True), "--gradient_checkpointing"))
        if self.run.training and not memory.activation_cpu_offload:
            on = dataclasses.replace(levels[-1][0], gradient_checkpointing=True, activation_cpu_offload=True)
            levels.append((on, "--gradient_checkpointing_cpu_offload"))
        return levels

    def auto(self, memory, budget: int) -> tuple[Fit, str]:
        """``--blocks_to_swap auto``: (the chosen fit, why) -- see the module docstring."""
        added: list[str] = []
        for level, flag in self._levels(memory):
            added += [flag] if flag else []
            fit = self.smallest_fit(level, budget)
            if fit is not None:
                return fit, self._reason(fit, budget, added)
        frugal = self.evaluate(dataclasses.replace(self._levels(memory)[-1][0], blocks_to_swap=self.max_swap()))
        raise UserError(
            f"--blocks_to_swap auto: nothing fits the {format_gib(budget)} budget; even --blocks_to_swap "
            f"{self.max_swap()}{' with ' + ' '.join(added) if added else ''} needs {format_gib(frugal.peak)} "
            f"({self._worst_name(frugal)}); {_last_resort(memory)}"
        )

    def _reason(self, fit: Fit, budget: int, added: list[str]) -> str:
        n = fit.memory.blocks_to_swap
        why = f"--blocks_to_swap {n}: predicted peak {format_gib(fit.peak)} fits the {format_gib(budget)} budget"
        if n > 0:
            less = self.evaluate(dataclasses.replace(fit.memory, blocks_to_swap=n - 1))
            why += f"; {n - 1} would need {format_gib(less.peak)}"
        if added:
            why += f"; turned on {' '.join(added)} (without it no swap count fits)"
        return why

    def _worst_name(self, fit: Fit) -> str:
        worst = max((e for e in (fit.train, fit.sample) if e is not None), key=lambda e: e.peak)
        return f"the {worst.title}"

    def suggestion(self, memory, budget: int) -> str:
        """The smallest change (same order as ``auto``) that makes ``memory`` fit, as flags to add."""
        for level, _ in self._levels(memory):
            fit = self.smallest_fit(level, budget)
            if fit is None:
                continue
            flags = [f for _, f in self._levels(memory) if f and _on(fit.memory, f)]
            if fit.memory.blocks_to_swap != memory.blocks_to_swap:
                flags.append(f"--blocks_to_swap {fit.memory.blocks_to_swap}")
            return f"add {' '.join(flags)} (or --blocks_to_swap auto)"
        return _last_resort(memory)


def _on(memory, flag: str) -> bool:
    return {"--gradient_checkpointing": memory.gradient_checkpointing,
            "--gradient_checkpointing_cpu_offload": memory.activation_cpu_offload}[flag]  # fmt: skip


def _last_resort(memory) -> str:
    fp8 = "" if memory.fp8 else "add --fp8_base, or "
    return f"{fp8}lower the resolution, frames or batch size, or use a card with more memory"


def device_budget(device: torch.device, vram_budget_gb: float | None) -> tuple[int | None, str]:
    """(budget bytes or None, where it came from); see the module docstring."""
    if vram_budget_gb is not None:
        if vram_budget_gb <= 0:
            raise UserError(f"--vram_budget_gb must be > 0 (GiB), got {vram_budget_gb}")
        return int(vram_budget_gb * GIB), f"--vram_budget_gb {vram_budget_gb:g}"
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
        return free - FREE_RESERVE, f"{name}: {format_gib(free)} free minus {format_gib(FREE_RESERVE)}"
    return None, "CPU run"


def check_memory(planner: Planner, memory, device: torch.device, what: str):
    """Log the plan, resolve ``auto``, and refuse (before loading) a configuration predicted not to fit.

    Returns the MemoryConfig to build with (``auto`` replaced by the chosen count and switches).
    """
    budget, source = device_budget(torch.device(device), memory.vram_budget_gb)
    if memory.auto_swap:
        if budget is None:
            raise UserError(
                "--blocks_to_swap auto needs a memory budget, and there is no CUDA device to read one from; "
                "pass --vram_budget_gb X (GiB) or a number for --blocks_to_swap"
            )
        fit, reason = planner.auto(memory, budget)
        log.info("--blocks_to_swap auto (%s): %s", source, reason)
        memory = fit.memory
    fit = planner.evaluate(memory)
    if budget is None:
        log.info("memory plan for %s: CPU run, predicted GPU peak %s (not checked: no CUDA device)", what,
                 format_gib(fit.peak))  # fmt: skip
        return memory
    log.info("memory plan for %s (budget %s = %s):\n%s", what, format_gib(budget), source, fit.table(budget))
    if fit.peak > budget:
        raise UserError(
            f"memory plan: the predicted peak {format_gib(fit.peak)} ({planner._worst_name(fit)}) does not fit the "
            f"{format_gib(budget)} budget ({source}); {planner.suggestion(memory, budget)}; or pass a larger "
            "--vram_budget_gb to run anyway"
        )
    return memory


def distinct(values: Sequence[StepShape]) -> tuple[StepShape, ...]:
    """Distinct shapes, the most tokens first."""
    return tuple(sorted(set(values), key=lambda s: (-s.batch * s.tokens, s.frames, s.height, s.width)))


def sampling_shape(task: TaskConfig, request) -> StepShape:
    """The DiT call of one generation request (``sampling.pipeline.GenerationRequest``): CFG batch 2 unless the
    guidance is 1; an I2V request sized from its image is planned at the task's I2V area (the image is not read)."""
    spec = request.spec
    batch = 2 if abs(spec.guidance - 1.0) > 1e-6 else 1
    height, width = spec.height, spec.width
    if getattr(request, "image", None) is not None and getattr(request, "fit_to_image", False):
        side = -(-int(task.i2v_max_area**0.5) // 16) * 16
        height = width = side
    return StepShape(batch, spec.frames, height, width, task.text_max_length)


def check_generation_memory(
    task: TaskConfig, dit_path, device, dtype, attention, memory, requests, runtime_lora, step_cache: bool = False,
    adapter_work: dict | None = None,
):  # fmt: skip
    """The generator's start-up check (see :func:`check_memory`): every request's sampling call, no LoRA state;
    ``step_cache``: MagCache (or its calibration) keeps residuals between steps; ``adapter_work``: the runtime
    adapters' :class:`Workload` fields (``network_workload``)."""
    from kandinsky5.model.loading import checkpoint_files, read_header

    work = Workload(attention="nabla" if attention.nabla else attention.backend, nabla=attention.nabla,
                    act_bytes=dtype.itemsize, runtime_lora=runtime_lora, step_cache=step_cache,
                    **(adapter_work or {}))  # fmt: skip
    shapes = distinct([sampling_shape(task, r) for r in requests])
    run = RunPlan(task, dtype, work, sample_shapes=shapes, header=read_header(checkpoint_files(dit_path)))
    return check_memory(Planner(run), memory, device, f"generation ({len(shapes)} shape(s))")
