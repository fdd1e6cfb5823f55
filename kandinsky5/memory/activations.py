"""The analytic peak-memory model of one training step and one sampling step, from the DiT's shapes.

Role: :func:`training_estimate` / :func:`sampling_estimate` add to the exact weight bytes of
``kandinsky5.memory_plan`` (resident weights, block-swap staging) everything else a step holds on the GPU: LoRA
parameters, gradients and optimizer state, the batch, the activations autograd saves, the largest transient inside
a block and an allocator margin.  Nothing is allocated: every term is a product of shapes, so a plan for the 19B
Pro model takes milliseconds and runs before any weight is read.

Shapes (``architecture.md`` 1): b batch, s = T' * H/16 * W/16 visual tokens, l text tokens, d model width, f FFN
width, h heads of hd, r LoRA rank; ``act`` is the activation itemsize (2 for bf16 autocast, 4 for fp32 runs).
Every count below is what ``kandinsky5.model.dit`` really keeps (checked tensor by tensor with saved-tensor hooks,
and as a whole against torch's fake-tensor ``MemTracker``: ``bench/bench_activations.py``).

Saved per visual block in training with the default LoRA targets (q/k/v/out of both attentions, FFN in/out):

* 3 LayerNorm inputs in fp32 (``modulate`` upcasts) + mean/rstd: 3 (4bsd + 8bs);
* 3 modulated inputs (the LoRA down-projections' input): 3 act bsd;
* q/k RMSNorm inputs in fp32 (self q, k; cross q; cross k on text): 3 (4bsd + 4bsh) + 4bld + 4blh;
* attention: self q, k, v, out + log-sum-exp, cross q, out, k, v + lse: 6 act bsd + 2 act bld + 8bhs;
* FFN hidden before and after GELU: 2 act bsf;
* LoRA: rank activations act r (8bs + 2bl) and the bf16 copies of the LoRA weights act r (18d + 2f);
* modulation vectors (fp32): 36bd + 12bd.

Text blocks: the same with l tokens, one attention and 6 LoRA targets.  The first block of each stream has a frozen
input, so it keeps one LayerNorm input and three LoRA weight copies fewer.  Shared by all blocks: the text stream
(act bld), the RoPE rows (``dit.rope_rows``: fp32 cos and sin (S, 1, hd): 8 s hd + 8 l hd) and the output layer's
LayerNorm input.

With ``--gradient_checkpointing`` a block keeps only its input x (act bsd, none with the CPU offload); in backward
one block is recomputed at a time, so the peak holds every stored input, one block's saved set and the gradients
in flight.  Backward of one block (the "largest transient"): at the FFN the gradient w.r.t. the GELU output exists
three times (base path, LoRA path, their sum) while the GELU output itself is already freed: 2 act bsf + act bsd
on top of the saved set; at attention the SDPA/flash backward adds dq, dk, dv and its fp32 dq accumulator
(3 act bsd + 4bsd); fp8 layers dequantise their weight again (:func:`dequant_bytes`).  LoRA gradients grow as
backward proceeds and stored inputs are freed, so the peak is evaluated at the first and the last visual block.

Sampling (no grad, batch = 2 for a batched CFG step): the residual stream exists three times inside a block (the
caller's input, the current x and the previous branch output) next to the modulated input, and the largest
transient is the FFN hidden (2 act bsf, also with an un-merged LoRA: ``networks.lora_fast`` adds the up-projection
into a copy of the base output, no separate branch tensor), the fp32 ``modulate`` chain (12bsd), RoPE on k (q, k, v
next to the block streams and two fp32 temporaries: 3 act bsd + 8bsd) or, with fp8, a dequantised weight (fp32
copy and product, 8 B per weight).

Attention kernels (``--sdpa`` on CUDA runs the flash kernel for bf16; ``--flash_attn`` / ``--flash3`` are the
same): saved q, k, v, out and an fp32 log-sum-exp, never the s x s scores.  NABLA (flex attention) saves the same
plus its block mask -- int32 indices ``(b, h, N, N)``, N = s / 64, for the kv and the transposed q direction -- and
builds the mask head chunk by head chunk with probabilities, a sort (values + int64 order) and an int64 argsort
(:func:`nabla_mask_bytes`): small at 256 x 256, about a gigabyte at Pro 10 s HD.

Optimizer state (fp32 LoRA): AdamW two fp32 moments (8 B/param) and one fp32 temporary per parameter in the
foreach step; AdamW8bit (bitsandbytes) two uint8 moments + one fp32 absmax per 256 values (and two shared
256-entry maps), fp32 moments for tensors under 4096 values; Adafactor (transformers, beta1 None) factored
fp32 row + column second moments per matrix.  Other optimizers are counted like AdamW.

Margin (:func:`allocator_margin`): 0.5 GiB for cuBLAS / kernel workspaces plus 10 % of everything that is not a
resident weight (the caching allocator's rounding and fragmentation grow with the activations that churn).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kandinsky5.configs import DiTConfig, NablaConfig, latent_frames

__all__ = [
    "StepShape",
    "Workload",
    "Term",
    "Estimate",
    "OPTIMIZERS",
    "lora_shapes",
    "network_workload",
    "optimizer_kind",
    "optimizer_state_bytes",
    "block_saved_bytes",
    "shared_saved_bytes",
    "dequant_bytes",
    "nabla_mask_bytes",
    "allocator_margin",
    "training_estimate",
    "sampling_estimate",
]

GIB = 1 << 30
OPTIMIZERS = {"adamw": "AdamW (two fp32 moments)", "adamw8bit": "AdamW8bit (uint8 moments)",
              "adafactor": "Adafactor (factored fp32)", "other": "assumed like AdamW"}  # fmt: skip
_BNB_BLOCK, _BNB_MIN = 256, 4096  # bitsandbytes blockwise quantisation, min_8bit_size
_MARGIN_FIXED, _MARGIN_FRACTION = GIB // 2, 0.10


@dataclass(frozen=True)
class StepShape:
    """One DiT call: batch, pixel frames (4k+1), pixel height/width and text tokens (padded length)."""

    batch: int
    frames: int
    height: int
    width: int
    text_tokens: int

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (T', H/16, W/16) after the VAE (8x spatial, 4x temporal) and the 1x2x2 patch."""
        return latent_frames(self.frames), self.height // 16, self.width // 16

    @property
    def tokens(self) -> int:
        t, gh, gw = self.grid
        return t * gh * gw

    @property
    def latent_elements(self) -> int:
        """Latent positions per sample: T' x H/8 x W/8."""
        t, gh, gw = self.grid
        return t * gh * gw * 4

    def describe(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}f, batch {self.batch}, {self.text_tokens} text tokens"


@dataclass(frozen=True)
class Workload:
    """What the step computes besides the DiT shape: LoRA, optimizer, attention, precision."""

    lora_rank: int = 32
    lora: tuple[tuple[int, int], ...] | None = None  # every LoRA tensor's 2-D shape; None: default targets
    optimizer: str = "adamw"  # see OPTIMIZERS
    attention: str = "sdpa"  # any dense backend name, or "nabla"
    nabla: NablaConfig | None = None
    act_bytes: int = 2  # activation itemsize: 2 bf16 autocast / bf16 run, 4 fp32
    runtime_lora: bool = True  # sampling: LoRA branches un-merged (their parameters count; no larger transient)
    accumulation: int = 1  # gradient accumulation: from the second micro-batch on every LoRA gradient exists
    shards: int = 1  # --fsdp ranks: the LoRA, its gradients and optimizer state are split over them
    branch_width: int | None = None  # per-token width a branch keeps between its products (None: lora_rank)
    delta_saved: int = 0  # LoHa: bytes of the small ΔW products autograd keeps for backward (all layers)
    delta_transient: int = 0  # LoHa: the largest layer's ΔW working set in backward (recomputed factors, cast)
    delta_forward: int = 0  # LoHa: the same in a no-grad forward (both factors and their product)
    kron_branches: bool = False  # LoKr: the FFN-in branch's gradient block (b s f) beside the hidden gradients
    step_cache: bool = False  # sampling with MagCache (or its calibration): cached residuals and the blocks' input


@dataclass(frozen=True)
class Term:
    """One line of the breakdown."""

    label: str
    nbytes: int
    note: str = ""


@dataclass(frozen=True)
class Estimate:
    """Predicted peak of one step: the terms at the peak phase, and that phase's name."""

    title: str
    phase: str
    terms: tuple[Term, ...]
    weights: int = 0  # resident weights + staging (the part that does not churn)
    extra: dict = field(default_factory=dict)

    @property
    def tensors(self) -> int:
        """Tensor bytes at the peak (what ``torch.cuda.max_memory_allocated`` reports), margin excluded."""
        return sum(t.nbytes for t in self.terms if t.label != "allocator margin")

    @property
    def peak(self) -> int:
        return sum(t.nbytes for t in self.terms)

    def table(self, budget: int | None = None) -> str:
        lines = [f"  {self.title} -- peak at {self.phase}:"]
        lines += [f"    {t.label:<40} {_gib(t.nbytes):>10}  {t.note}".rstrip() for t in self.terms]
        tail = f"    {'predicted peak':<40} {_gib(self.peak):>10}"
        if budget is not None:
            verdict = "fits" if self.peak <= budget else "does NOT fit"
            tail += f"  of {_gib(budget)} budget: {verdict} ({_gib(budget - self.peak)} left)"
        return "\n".join([*lines, tail])


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB"


# ----------------------------------------------------------------------------------------------------------------
# LoRA and optimizer state
# ----------------------------------------------------------------------------------------------------------------


def lora_shapes(cfg: DiTConfig, rank: int) -> list[tuple[int, int]]:
    """(r, in) and (out, r) of every LoRA tensor for the default targets (``networks.lora_kandinsky``)."""
    d, f = cfg.model_dim, cfg.ff_dim
    attn = [(d, d)] * 4
    ffn = [(d, f), (f, d)]
    linears = (attn + ffn) * cfg.num_text_blocks + (attn * 2 + ffn) * cfg.num_visual_blocks
    return [s for i, o in linears for s in ((rank, i), (o, rank))]


def network_workload(network, act_bytes: int) -> dict[str, int | bool]:
    """The :class:`Workload` adapter fields of ``network`` from each adapter's ``memory_profile``: ``branch_width``
    (the mean over the targets: r for LoRA, the ``(in_m, out_k)`` block of ``w1 · X · w2ᵀ`` for LoKr, about a
    layer's width, 0 for LoHa), ``delta_saved`` (the sum), ``delta_transient`` / ``delta_forward`` (the largest
    LoHa ΔW working sets, ``networks.lycoris``) and ``kron_branches`` (any LoKr)."""
    profiles = [m.memory_profile(act_bytes) for m in network.lora_modules if hasattr(m, "memory_profile")]
    widths, saved, backward, forward = zip(*profiles) if profiles else ((0,), (0,), (0,), (0,))
    return {"branch_width": sum(widths) // len(widths), "delta_saved": sum(saved), "delta_transient": max(backward),
            "delta_forward": max(forward),
            "kron_branches": any(getattr(m, "kind", "") == "lokr" for m in network.lora_modules)}  # fmt: skip


def optimizer_kind(name: str) -> str:
    """``--optimizer_type`` -> a key of :data:`OPTIMIZERS` (unknown classes count like AdamW)."""
    lower = name.lower().rsplit(".", 1)[-1]
    return lower if lower in OPTIMIZERS else "other"


def optimizer_state_bytes(kind: str, shapes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(persistent state bytes, largest temporary of one step) for fp32 LoRA tensors of ``shapes``."""
    sizes = [a * b for a, b in shapes]
    if kind == "adamw8bit":
        state = sum(2 * n + 2 * 4 * -(-n // _BNB_BLOCK) if n >= _BNB_MIN else 8 * n for n in sizes)
        shared_maps = 2 * 256 * 4 if any(n >= _BNB_MIN for n in sizes) else 0  # the two quantisation maps
        return state + shared_maps, 0
    if kind == "adafactor":
        state = sum(4 * (a + b) for a, b in shapes)
        return state, 2 * 4 * max(sizes, default=0)  # grad^2 and the r x c product, one tensor at a time
    return 8 * sum(sizes), 4 * sum(sizes)  # AdamW (foreach): the sqrt(v) list


# ----------------------------------------------------------------------------------------------------------------
# saved activations (training)
# ----------------------------------------------------------------------------------------------------------------


def block_saved_bytes(cfg: DiTConfig, shape: StepShape, work: Workload, visual: bool, first: bool = False) -> int:
    """Bytes autograd keeps for one block's backward (default LoRA targets; see the module docstring)."""
    b, s, lt, a, r = shape.batch, shape.tokens, shape.text_tokens, work.act_bytes, work.lora_rank
    rb = r if work.branch_width is None else work.branch_width  # LoKr: its (in_m, out_k) block; LoHa: 0
    d, f, h, hd = cfg.model_dim, cfg.ff_dim, cfg.num_heads, cfg.head_dim
    n = s if visual else lt  # tokens of this stream
    mods = 3 if visual else 2
    total = mods * (4 * b * n * d + 8 * b * n) + mods * a * b * n * d  # LayerNorm inputs, modulated inputs
    total += 2 * (4 * b * n * d + 4 * b * n * h) + 2 * 4 * hd  # self q/k RMSNorm
    total += 4 * a * b * n * d + 4 * b * h * n + 2 * a * b * n * f  # self attention, FFN hidden
    total += 4 * b * (9 if visual else 6) * d + mods * 4 * b * d  # modulation vectors
    linears = 10 if visual else 6
    total += a * rb * (linears - (2 if visual else 0)) * b * n + a * r * (2 * (linears - 2) * d + 2 * (d + f))
    if visual:  # cross attention: q RMSNorm on visual tokens, k RMSNorm on text, q/out + k/v, lse, LoRA k/v rank
        total += 4 * b * n * d + 4 * b * n * h + 4 * b * lt * d + 4 * b * lt * h + 2 * 4 * hd
        total += 2 * a * b * n * d + 2 * a * b * lt * d + 4 * b * h * n + 2 * a * rb * b * lt
    if work.attention == "nabla" and visual:
        total += 3 * 4 * b * h * _blocks(s) ** 2 + 4 * b * h * _blocks(s)  # flex BlockMask kv + q indices
    if first:  # frozen input: no LayerNorm input and no LoRA weight copies for the q/k/v down-projections
        total -= 4 * b * n * d + 8 * b * n + 4 * b * d + 3 * a * r * d
    return total


def shared_saved_bytes(cfg: DiTConfig, shape: StepShape, work: Workload, output_layer: bool = True) -> int:
    """Saved once for all blocks: the text stream, the RoPE rows and (until its backward ran first) the output
    layer's LayerNorm input."""
    b, s, lt, a = shape.batch, shape.tokens, shape.text_tokens, work.act_bytes
    d, hd = cfg.model_dim, cfg.head_dim
    out = 4 * b * s * d + 8 * b * s + 4 * b * d if output_layer else 0
    return a * b * lt * d + 8 * s * hd + 8 * lt * hd + out


def _blocks(tokens: int) -> int:
    return tokens // 64


def batch_bytes(cfg: DiTConfig, shape: StepShape, phase: str, act: int) -> int:
    """The batch on the device (``phase``: "forward", "backward" or "sampling").

    Training (fp32): x0, noise, x_t, target and the 33-channel input during the forward, x0 and noise in
    backward (the loss's own saved error is freed first); the text embeddings throughout.  Sampling: the latents
    and the DiT input of the cond rows, their CFG concatenation and its cast to the run dtype, and the text
    embeddings (run dtype).
    """
    b, pos, lt = shape.batch, shape.latent_elements, shape.text_tokens
    c, ci = cfg.out_visual_dim, cfg.in_channels
    text = b * lt * cfg.in_text_dim + b * cfg.in_text_dim2
    if phase == "forward":
        return 4 * b * pos * (4 * c + ci) + 4 * text
    if phase == "backward":
        return 4 * b * pos * 2 * c + 4 * text
    rows = b // 2 if b >= 2 else b  # a batched CFG call: cond rows + the same rows again for uncond
    cat = 4 * b * pos * ci if b > rows else 0
    return 4 * rows * pos * (c + ci) + cat + act * b * pos * ci + act * text


# ----------------------------------------------------------------------------------------------------------------
# transients
# ----------------------------------------------------------------------------------------------------------------


def dequant_bytes(cfg: DiTConfig, fp8: bool) -> int:
    """Largest fp8 dequantisation temporaries: the FFN weight upcast to fp32 and its scaled product (8 B/weight)."""
    return 8 * cfg.model_dim * cfg.ff_dim if fp8 else 0


def nabla_mask_bytes(cfg: DiTConfig, shape: StepShape, prob_bytes: int, training: bool) -> int:
    """NABLA's mask work (``kandinsky5.model.nabla``): the bool (b, h, N, N) mask, plus the larger of

    * ``block_mask``'s head chunk: probabilities and their sorted copy (``prob_bytes`` each: fp32 softmax under
      autocast, the run dtype otherwise), the int64 sort order and the kept flags per element;
    * the flex inputs of one sample: int32 kv indices (h, N, N), a chunk's int8 copy and int64 argsort, and in
      training ``BlockMask``'s transposed (q-direction) indices: a dense int32 copy, an int64 argsort and two int32
      results per element.
    """
    from kandinsky5.model import nabla

    b, h, n = shape.batch, cfg.num_heads, _blocks(shape.tokens)
    widest = max(c.stop - c.start for c in nabla._head_chunks(b, h, n))
    mask, sample = b * h * n * n, h * n * n
    select = widest * b * n * n * (2 * prob_bytes + 9)
    kv_chunk = max(c.stop - c.start for c in nabla._head_chunks(1, h, n)) * n * n
    flex = 4 * sample + max(9 * kv_chunk, (4 + 8 + 8) * sample if training else 0)
    return mask + max(select, flex)


def _attention_transient(cfg: DiTConfig, shape: StepShape, work: Workload, training: bool) -> tuple[int, str]:
    """Attention's working set beyond the saved set / block streams: q, k, v plus the kernel's own tensors."""
    b, s, a, d, h = shape.batch, shape.tokens, work.act_bytes, cfg.model_dim, cfg.num_heads
    if work.attention == "nabla" and not training:
        return nabla_mask_bytes(cfg, shape, a, False) + 3 * a * b * s * d, "NABLA block-mask construction"
    if training:
        return 3 * a * b * s * d + 4 * b * s * d, f"{work.attention} backward: dq, dk, dv + fp32 dq accumulator"
    return 4 * a * b * s * d + 4 * b * h * s + 4 * b * s * d, f"{work.attention}: q, k, v, out, lse"


def _self_attention_prefix(cfg: DiTConfig, shape: StepShape, work: Workload) -> int:
    """Saved bytes of a visual block up to its self-attention kernel (first LayerNorm, modulated input, q/k
    RMSNorm inputs, q, k, v and their LoRA rank activations): what exists while NABLA builds its mask."""
    b, s, a, d, h = shape.batch, shape.tokens, work.act_bytes, cfg.model_dim, cfg.num_heads
    return (
        4 * b * s * d
        + 8 * b * s
        + a * b * s * d
        + 2 * (4 * b * s * d + 4 * b * s * h)
        + 3 * a * b * s * d
        + (3 * a * (work.lora_rank if work.branch_width is None else work.branch_width) * b * s)
    )


def _ffn_backward(cfg: DiTConfig, shape: StepShape, work: Workload, fp8: bool) -> tuple[int, str]:
    b, s, a = shape.batch, shape.tokens, work.act_bytes
    d, f = cfg.model_dim, cfg.ff_dim
    grads = (2 + work.kron_branches) * a * b * s * f + a * b * s * d  # LoKr: its reshaped output gradient too
    deq = dequant_bytes(cfg, fp8) + a * b * s * f
    if deq > grads:
        return deq, "fp8 dequantised FFN weight (fp32) in backward"
    return grads, f"FFN hidden gradients ({3 + work.kron_branches} x b s f, GELU output freed)"


def _backward_transient(cfg: DiTConfig, shape: StepShape, work: Workload, fp8: bool) -> tuple[int, str]:
    """The gradients in flight inside one visual block's backward, beyond its saved set."""
    delta = (work.delta_transient, "LoHa ΔW of the largest layer (recomputed factors, cast ΔW)")
    return max(_ffn_backward(cfg, shape, work, fp8), _attention_transient(cfg, shape, work, True), delta)


def _forward_transient(cfg: DiTConfig, shape: StepShape, work: Workload, fp8: bool) -> tuple[int, str]:
    """The largest working set inside one block without autograd, beyond the block input."""
    b, s, a = shape.batch, shape.tokens, work.act_bytes
    d, f = cfg.model_dim, cfg.ff_dim
    streams = 3 * a * b * s * d  # current x, previous branch output, modulated input
    hidden = 2 * a * b * s * f  # a runtime LoRA's up-projection accumulates into a copy of the base output (addmm)
    options = [
        (streams + hidden, "FFN hidden (2 x b s f)"),
        (2 * a * b * s * d + 12 * b * s * d, "modulate fp32 chain (3 x 4 b s d)"),
        (streams + 3 * a * b * s * d + 8 * b * s * d, "RoPE on k: q, k, v and two fp32 (b s d) temporaries"),
        (streams + dequant_bytes(cfg, fp8) + a * b * s * f, "fp8 dequantised FFN weight (fp32)"),
    ]
    attn, label = _attention_transient(cfg, shape, work, False)
    options.append((streams + attn, label))
    if work.runtime_lora and work.delta_forward:  # formed beside the FFN hidden (its input) and the base output
        options.append((streams + 2 * a * b * s * f + work.delta_forward, "LoHa ΔW of the largest layer"))
    return max(options)


def allocator_margin(dynamic: int) -> int:
    """The stated allocator margin: 0.5 GiB of workspaces plus 10 % of the non-weight bytes."""
    return _MARGIN_FIXED + int(_MARGIN_FRACTION * dynamic)


# ----------------------------------------------------------------------------------------------------------------
# whole steps
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Switches:
    fp8: bool
    fast: bool
    checkpointing: bool
    offload: bool


def _switches(memory) -> _Switches:
    ckpt = bool(getattr(memory, "gradient_checkpointing", False))
    offload = ckpt and bool(getattr(memory, "activation_cpu_offload", False))
    return _Switches(bool(memory.fp8), bool(getattr(memory, "fp8_fast", False)), ckpt, offload)


@dataclass(frozen=True)
class _LoRA:
    params: int  # bytes of the fp32 LoRA parameters (= their gradients)
    state: int  # optimizer state bytes
    step_temp: int  # the optimizer step's temporary
    grad_per_visual_block: int

    def terms(self, work: Workload, grads: int | None = None) -> list[Term]:
        out = [Term("LoRA parameters (fp32)", self.params, f"{self.params // 4:,} params"),
               Term("optimizer state", self.state, OPTIMIZERS[work.optimizer])]  # fmt: skip
        return out if grads is None else [*out, Term("LoRA gradients (fp32)", grads)]


def _lora(cfg: DiTConfig, work: Workload) -> _LoRA:
    default = lora_shapes(cfg, work.lora_rank)
    shapes = list(work.lora) if work.lora is not None else default
    params = 4 * sum(a * b for a, b in shapes) // work.shards
    state, temp = (x // work.shards for x in optimizer_state_bytes(work.optimizer, shapes))
    per_visual = 4 * work.lora_rank * (18 * cfg.model_dim + 2 * cfg.ff_dim)  # default targets, scaled to the real set
    per_visual = per_visual * params // max(1, 4 * sum(a * b for a, b in default))
    return _LoRA(params, state, temp, per_visual)


def _stored(cfg: DiTConfig, shape: StepShape, work: Workload, sw: _Switches) -> tuple[int, int, int, int]:
    """(per visual block, first visual block, per text block, first text block) bytes kept until backward."""
    if sw.checkpointing:
        keep = 0 if sw.offload else work.act_bytes * shape.batch * cfg.model_dim
        return keep * shape.tokens, keep * shape.tokens, keep * shape.text_tokens, keep * shape.text_tokens
    v, v0 = (block_saved_bytes(cfg, shape, work, True, first) for first in (False, True))
    t, t0 = (block_saved_bytes(cfg, shape, work, False, first) for first in (False, True))
    return v, v0, t, t0


def _activation_phases(cfg: DiTConfig, shape: StepShape, work: Workload, sw: _Switches, lora: _LoRA):
    """(phase, stored activations, transient term, LoRA gradient bytes) at the end of the forward and at the last
    and first visual block of the backward (gradients grow, stored inputs shrink: the extremes are the ends)."""
    nv, nt = cfg.num_visual_blocks, cfg.num_text_blocks
    b, s, a, d = shape.batch, shape.tokens, work.act_bytes, cfg.model_dim
    v, v0, t, t0 = _stored(cfg, shape, work, sw)
    text = (t0 + (nt - 1) * t if nt else 0) + work.delta_saved  # LoHa's small ΔWs: kept like the text stream
    shared = shared_saved_bytes(cfg, shape, work, output_layer=False)
    recompute = block_saved_bytes(cfg, shape, work, True) if sw.checkpointing else 0
    recompute += a * b * s * d if sw.offload else 0  # the recomputed block's input, copied back
    bwd = Term("largest transient", *_backward_transient(cfg, shape, work, sw.fp8))
    full = lora.params if work.accumulation > 1 else None
    out_layer = Term("largest transient", 12 * b * s * d + a * b * s * d, "output layer modulate (fp32)")
    forward_end = text + v0 + (nv - 1) * v + shared_saved_bytes(cfg, shape, work)
    phases = [
        ("the end of the forward", forward_end, out_layer, full or 0),
        ("the backward of the last block", text + v0 + (nv - 1) * v + shared + recompute, bwd,
         full or lora.grad_per_visual_block),
        ("the backward of the first visual block", text + v0 + shared + recompute, bwd,
         full or lora.grad_per_visual_block * nv),
    ]  # fmt: skip
    if work.attention == "nabla":  # the mask is built in the (re)computed forward of the last block
        mask = Term("largest transient", nabla_mask_bytes(cfg, shape, 4, True), "NABLA block-mask construction")
        stored = text + v0 + (nv - 1) * v + shared_saved_bytes(cfg, shape, work)
        phases.append(("NABLA's mask in the last block", stored + _self_attention_prefix(cfg, shape, work), mask,
                       full or lora.grad_per_visual_block))  # fmt: skip
    return phases


def training_estimate(cfg: DiTConfig, shape: StepShape, memory, weights, work: Workload) -> Estimate:
    """Peak of one LoRA step (forward, backward, optimizer step) for the switches of ``memory`` (a MemoryConfig)
    and ``weights``, the ``memory_plan.MemoryPlan`` of the same switches."""
    sw, lora = _switches(memory), _lora(cfg, work)
    base = _weight_terms(weights)
    batch = {p: Term("batch tensors", batch_bytes(cfg, shape, p, work.act_bytes)) for p in ("forward", "backward")}
    phases = []
    for name, acts, transient, grads in _activation_phases(cfg, shape, work, sw, lora):
        saved = Term("saved activations", acts, _acts_note(sw))
        phase_batch = batch["forward" if name.endswith("forward") else "backward"]
        phases.append((name, [*base, *lora.terms(work, grads), phase_batch, saved, transient]))
    step = Term("largest transient", lora.step_temp, "optimizer step")
    phases.append(("the optimizer step", [*base, *lora.terms(work, lora.params), batch["backward"], step]))
    phase, terms = max(phases, key=lambda p: sum(t.nbytes for t in p[1]))
    return _finish("training step", phase, terms, weights.gpu)


def _weight_terms(weights) -> list[Term]:
    terms = [Term("weights (resident)", weights.gpu_fp8 + weights.gpu_hp)]
    if weights.streamed:
        slots = f"{min(2, weights.streamed)} of {weights.streamed} streamed blocks"
        terms.append(Term("block-swap staging", weights.gpu_staging, slots))
    return terms


def _acts_note(sw: _Switches) -> str:
    if sw.offload:
        return "block inputs in CPU memory; one block recomputed"
    return "every block's input + one recomputed block" if sw.checkpointing else "every block"


def sampling_estimate(
    cfg: DiTConfig, shape: StepShape, memory, weights, work: Workload, lora_state: bool = False
) -> Estimate:
    """Peak of one no-grad DiT call at ``shape`` (batch 2 for batched CFG).  ``lora_state``: the LoRA and its
    optimizer state stay on the GPU (sampling during training; the gradients are freed)."""
    sw = _switches(memory)
    b, s, lt, a, d = shape.batch, shape.tokens, shape.text_tokens, work.act_bytes, cfg.model_dim
    transient, label = _forward_transient(cfg, shape, work, sw.fp8 and not sw.fast)
    resident = a * b * s * d + a * b * lt * d + 8 * s * cfg.head_dim  # block input, text stream, RoPE rows
    terms = _weight_terms(weights) + (_lora(cfg, work).terms(work) if lora_state else [])
    terms += [Term("batch tensors", batch_bytes(cfg, shape, "sampling", a)),
              Term("activations", resident, "block input, text stream, RoPE rows"),
              Term("largest transient", transient, label)]  # fmt: skip
    if work.step_cache:  # one residual per CFG stream across steps, and the stack's input held for the next one
        terms.append(Term("MagCache residuals", a * (max(b, 2) + b) * s * d, "cond + uncond residual, blocks' input"))
    return _finish("sampling step", "the worst block", terms, weights.gpu)


def _finish(title: str, phase: str, terms: list[Term], weights: int) -> Estimate:
    dynamic = sum(t.nbytes for t in terms) - weights
    terms = [*terms, Term("allocator margin", allocator_margin(dynamic), "0.5 GiB + 10 % of non-weight bytes")]
    return Estimate(title, phase, tuple(terms), weights)
