"""Task registry: frozen, typed configurations for every Kandinsky 5 video model we support.

A *task* (``--task k5-pro-t2v-5s-sd``) fixes the DiT architecture, the attention type (dense or NABLA with its
parameters) and the inference defaults (resolution, frames, steps, guidance, scheduler scale, RoPE scale factor,
text length).  It never fixes the weights: those come from ``--dit``.

Every task is derived with ``dataclasses.replace`` from three architecture bases (Lite 2B, Pro 19B and a tiny
debug model) so that numbers live in one place.  Dims follow the official ``configs/*.yaml``
(see ``architecture.md`` section 0):

=====  ====  =====  ====  ===========  =============  ===============  ==========
family  D     F      Tm    text blocks  visual blocks  axes_dims (hd)   in channels
=====  ====  =====  ====  ===========  =============  ===============  ==========
lite   1792  7168   512   2            32             (16,24,24) 64    33
pro    4096  16384  1024  4            60             (32,48,48) 128   33
tiny   128   512    128   1            4              (16,24,24) 64    33
=====  ====  =====  ====  ===========  =============  ===============  ==========

Frame counts here are always *pixel* frames (4k+1); latent frames are ``(frames - 1) // 4 + 1``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = [
    "DiTConfig",
    "NablaConfig",
    "TaskConfig",
    "TASKS",
    "get_task",
    "task_names",
    "latent_frames",
    "prompt_template",
    "LITE_DIT",
    "PRO_DIT",
    "TINY_DIT",
]


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of the CrossDiT.  Field names follow the official yaml ``model.dit_params``."""

    model_dim: int  # D: width of the residual stream
    ff_dim: int  # F: hidden width of the GELU feed-forward (4 * D in every release)
    time_dim: int  # Tm: width of the time / pooled-text conditioning vector
    num_text_blocks: int  # "linguistic token refiner" encoder blocks
    num_visual_blocks: int  # cross-attention decoder blocks
    axes_dims: tuple[int, int, int]  # RoPE3D split of the head dim over (t, h, w)
    in_text_dim: int = 3584  # Qwen2.5-VL-7B hidden size
    in_text_dim2: int = 768  # CLIP ViT-L/14 pooled size
    in_visual_dim: int = 16  # VAE latent channels
    out_visual_dim: int = 16  # predicted velocity channels
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w) patchify
    visual_cond: bool = True  # 33-channel input: latent | cond latent | mask (all released video models)

    @property
    def head_dim(self) -> int:
        return sum(self.axes_dims)

    @property
    def num_heads(self) -> int:
        return self.model_dim // self.head_dim

    @property
    def in_channels(self) -> int:
        """Channels of the DiT input ``x`` (33 for every video model: 16 latent + 16 cond + 1 mask)."""
        return 2 * self.in_visual_dim + 1 if self.visual_cond else self.in_visual_dim

    def __post_init__(self) -> None:
        if self.model_dim % self.head_dim:
            raise ValueError(f"model_dim {self.model_dim} is not a multiple of head_dim {self.head_dim}")
        if any(a % 2 for a in self.axes_dims):
            raise ValueError(f"axes_dims {self.axes_dims} must all be even (RoPE rotates pairs)")


@dataclass(frozen=True)
class NablaConfig:
    """NABLA block-sparse visual self-attention (``architecture.md`` section 2.3)."""

    P: float = 0.9  # CDF threshold: keep the key blocks that hold ~P of the pooled attention mass
    method: str = "topcdf"  # "topcdf" (official) or "topk" (keep a fixed fraction P of the blocks)
    wT: int = 11  # STA window in latent frames
    wH: int = 3  # STA window in 8x8-token tiles (height)
    wW: int = 3  # STA window in 8x8-token tiles (width)
    add_sta: bool = True  # OR the sliding-tile prior into the dynamic mask

    def __post_init__(self) -> None:
        if self.method not in ("topcdf", "topk"):
            raise ValueError(f"NABLA method must be 'topcdf' or 'topk', got {self.method!r}")
        if not 0.0 < self.P <= 1.0:
            raise ValueError(f"NABLA P must be in (0, 1], got {self.P}")


@dataclass(frozen=True)
class TaskConfig:
    """One ``--task``: architecture + attention + inference defaults.  Weights are never part of a task."""

    name: str
    family: str  # "lite" | "pro" | "tiny"
    mode: str  # "t2v" | "i2v"
    dit: DiTConfig
    checkpoint: str  # official file name of the default checkpoint (informational; --dit is required)
    hf_repo: str = ""
    nabla: NablaConfig | None = None  # None = dense attention
    width: int = 512
    height: int = 512
    frames: int = 121  # pixel frames, 4k+1 (5 s at 24 fps)
    fps: int = 24
    steps: int = 50
    guidance: float = 5.0
    scheduler_scale: float = 10.0
    rope_scale: tuple[float, float, float] = (1.0, 2.0, 2.0)
    text_template: str = "video"  # Qwen prompt template (architecture.md 3.1)
    text_max_length: int = 256  # Qwen tokens kept after the template prefix
    clip_max_length: int = 77
    i2v_max_area: int = 512 * 768  # I2V: output area follows the image, resized to about this many pixels
    i2v_divisibility: int = 16  # I2V: output H and W are multiples of this
    description: str = ""
    official_config: str = ""  # the official ``configs/*.yaml`` this task follows ("" = none); MagCache ratios key

    @property
    def is_i2v(self) -> bool:
        return self.mode == "i2v"

    @property
    def uses_nabla(self) -> bool:
        return self.nabla is not None

    def summary(self) -> str:
        attn = f"NABLA P={self.nabla.P}" if self.nabla else "dense"
        return (
            f"{self.name}: {self.family} {self.mode.upper()}, {attn}, {self.width}x{self.height}x{self.frames}f, "
            f"{self.steps} steps, cfg {self.guidance}, scheduler_scale {self.scheduler_scale}"
        )


def latent_frames(frames: int) -> int:
    """Pixel frames (4k+1) -> latent frames of the HunyuanVideo VAE."""
    if frames < 1 or (frames - 1) % 4:
        lo = max(1, (frames - 1) // 4 * 4 + 1)
        raise ValueError(f"frame count must be 4k+1 (1, 5, 9, ..., 121); got {frames}, nearest valid: {lo}, {lo + 4}")
    return (frames - 1) // 4 + 1


def prompt_template(frames: int, task: TaskConfig | None = None) -> str:
    """The Qwen prompt template for ``frames`` pixel frames, as the official sampler picks it: ``"image"`` for one
    frame, the task's template (``"video"``) otherwise.  Caching and sampling both use this rule."""
    return "image" if frames == 1 else (task.text_template if task is not None else "video")


# --------------------------------------------------------------------------------------------------------------
# Architecture bases
# --------------------------------------------------------------------------------------------------------------

LITE_DIT = DiTConfig(
    model_dim=1792, ff_dim=7168, time_dim=512, num_text_blocks=2, num_visual_blocks=32, axes_dims=(16, 24, 24)
)
PRO_DIT = DiTConfig(
    model_dim=4096, ff_dim=16384, time_dim=1024, num_text_blocks=4, num_visual_blocks=60, axes_dims=(32, 48, 48)
)
# Tiny debug model: same structure (33 input channels, head dim 64 split like Lite), a couple of million
# parameters.  Its text widths match the tiny Qwen2.5-VL (hidden 64) and CLIP (hidden 32) of kandinsky5.tiny_weights.
TINY_DIT = DiTConfig(
    model_dim=128,
    ff_dim=512,
    time_dim=128,
    num_text_blocks=1,
    num_visual_blocks=4,
    axes_dims=(16, 24, 24),
    in_text_dim=64,
    in_text_dim2=32,
)

_HD = dict(width=1024, height=1024, rope_scale=(1.0, 3.16, 3.16), i2v_max_area=1024 * 1024, i2v_divisibility=128)
_TEN_SECONDS = dict(frames=241)


def _nabla(P: float) -> NablaConfig:
    return NablaConfig(P=P)


_LITE = TaskConfig(
    name="k5-lite-t2v-5s-sd",
    family="lite",
    mode="t2v",
    dit=LITE_DIT,
    checkpoint="kandinsky5lite_t2v_sft_5s.safetensors",
    hf_repo="kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s",
    description="Lite 2B text-to-video, 5 s, SFT",
    official_config="k5_lite_t2v_5s_sft_sd.yaml",
)
_PRO = TaskConfig(
    name="k5-pro-t2v-5s-sd",
    family="pro",
    mode="t2v",
    dit=PRO_DIT,
    checkpoint="kandinsky5pro_t2v_sft_5s.safetensors",
    hf_repo="kandinskylab/Kandinsky-5.0-T2V-Pro-sft-5s",
    description="Pro 19B text-to-video, 5 s, SFT (also for the pretrain 5 s checkpoint)",
    official_config="k5_pro_t2v_5s_sft_sd.yaml",
)
_TINY = TaskConfig(
    name="k5-tiny-t2v",
    family="tiny",
    mode="t2v",
    dit=TINY_DIT,
    checkpoint="k5_tiny_t2v.safetensors",
    width=128,
    height=128,
    frames=9,
    steps=8,
    guidance=5.0,
    scheduler_scale=5.0,
    i2v_max_area=128 * 128,
    description="tiny random-weight debug model for tests, CI and the demo",
)


def _variant(base: TaskConfig, name: str, **changes) -> TaskConfig:
    return dataclasses.replace(base, name=name, **changes)


def _lite(name: str, ckpt: str, repo: str, desc: str, **changes) -> TaskConfig:
    return _variant(_LITE, name, checkpoint=ckpt, hf_repo=repo, description=desc, **changes)


_TASK_LIST = [
    # ---- Pro 19B -------------------------------------------------------------------------------------------
    _PRO,
    _variant(
        _PRO,
        "k5-pro-t2v-5s-hd",
        nabla=_nabla(0.8),
        description="Pro 19B text-to-video, 5 s, HD",
        official_config="k5_pro_t2v_5s_sft_hd.yaml",
        **_HD,
    ),
    _variant(
        _PRO,
        "k5-pro-t2v-10s-sd",
        nabla=_nabla(0.9),
        checkpoint="kandinsky5pro_t2v_sft_10s.safetensors",
        hf_repo="kandinskylab/Kandinsky-5.0-T2V-Pro-sft-10s",
        description="Pro 19B text-to-video, 10 s, SFT (also for the pretrain 10 s checkpoint)",
        official_config="k5_pro_t2v_10s_sft_sd.yaml",
        **_TEN_SECONDS,
    ),
    _variant(
        _PRO,
        "k5-pro-t2v-10s-hd",
        nabla=_nabla(0.7),
        checkpoint="kandinsky5pro_t2v_sft_10s.safetensors",
        hf_repo="kandinskylab/Kandinsky-5.0-T2V-Pro-sft-10s",
        description="Pro 19B text-to-video, 10 s, HD",
        official_config="k5_pro_t2v_10s_sft_hd.yaml",
        **_TEN_SECONDS,
        **_HD,
    ),
    _variant(
        _PRO,
        "k5-pro-i2v-5s-sd",
        mode="i2v",
        checkpoint="kandinsky5pro_i2v_sft_5s.safetensors",
        hf_repo="kandinskylab/Kandinsky-5.0-I2V-Pro-sft-5s",
        description="Pro 19B image-to-video, 5 s",
        official_config="k5_pro_i2v_5s_sft_sd.yaml",
    ),
    _variant(
        _PRO,
        "k5-pro-i2v-5s-hd",
        mode="i2v",
        nabla=_nabla(0.8),
        scheduler_scale=5.0,
        checkpoint="kandinsky5pro_i2v_sft_5s.safetensors",
        hf_repo="kandinskylab/Kandinsky-5.0-I2V-Pro-sft-5s",
        description="Pro 19B image-to-video, 5 s, HD",
        official_config="k5_pro_i2v_5s_sft_hd.yaml",
        **_HD,
    ),
    # ---- Lite 2B -------------------------------------------------------------------------------------------
    _LITE,
    _lite(
        "k5-lite-t2v-10s-sd",
        "kandinsky5lite_t2v_sft_10s.safetensors",
        "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-10s",
        "Lite 2B text-to-video, 10 s, SFT",
        official_config="k5_lite_t2v_10s_sft_sd.yaml",
        nabla=_nabla(0.9),
        **_TEN_SECONDS,
    ),
    _lite(
        "k5-lite-t2v-5s-pretrain-sd",
        "kandinsky5lite_t2v_pretrain_5s.safetensors",
        "kandinskylab/Kandinsky-5.0-T2V-Lite-pretrain-5s",
        "Lite 2B text-to-video, 5 s, pretrain",
        official_config="k5_lite_t2v_5s_pretrain_sd.yaml",
    ),
    _lite(
        "k5-lite-t2v-10s-pretrain-sd",
        "kandinsky5lite_t2v_pretrain_10s.safetensors",
        "kandinskylab/Kandinsky-5.0-T2V-Lite-pretrain-10s",
        "Lite 2B text-to-video, 10 s, pretrain",
        official_config="k5_lite_t2v_10s_pretrain_sd.yaml",
        nabla=_nabla(0.9),
        **_TEN_SECONDS,
    ),
    _lite(
        "k5-lite-t2v-5s-nocfg-sd",
        "kandinsky5lite_t2v_nocfg_5s.safetensors",
        "kandinskylab/Kandinsky-5.0-T2V-Lite-nocfg-5s",
        "Lite 2B text-to-video, 5 s, CFG-distilled (guidance 1)",
        official_config="k5_lite_t2v_5s_nocfg_sd.yaml",
        guidance=1.0,
    ),
    _lite(
        "k5-lite-t2v-10s-nocfg-sd",
        "kandinsky5lite_t2v_nocfg_10s.safetensors",  # the official yaml points at the sft file: a copy-paste slip
        "kandinskylab/Kandinsky-5.0-T2V-Lite-nocfg-10s",
        "Lite 2B text-to-video, 10 s, CFG-distilled (guidance 1)",
        official_config="k5_lite_t2v_10s_nocfg_sd.yaml",
        guidance=1.0,
        nabla=_nabla(0.9),
        **_TEN_SECONDS,
    ),
    _lite(
        "k5-lite-t2v-5s-distil-sd",
        "kandinsky5lite_t2v_distilled16steps_5s.safetensors",
        "kandinskylab/Kandinsky-5.0-T2V-Lite-distilled16steps-5s",
        "Lite 2B text-to-video, 5 s, 16-step distilled",
        official_config="k5_lite_t2v_5s_distil_sd.yaml",
        steps=16,
        guidance=1.0,
        scheduler_scale=5.0,
    ),
    _lite(
        "k5-lite-t2v-10s-distil-sd",
        "kandinsky5lite_t2v_distilled16steps_10s.safetensors",
        "kandinskylab/Kandinsky-5.0-T2V-Lite-distilled16steps-10s",
        "Lite 2B text-to-video, 10 s, 16-step distilled",
        official_config="k5_lite_t2v_10s_distil_sd.yaml",
        steps=16,
        guidance=1.0,
        nabla=_nabla(0.9),
        **_TEN_SECONDS,
    ),
    _lite(
        "k5-lite-i2v-5s-sd",
        "kandinsky5lite_i2v_5s.safetensors",
        "kandinskylab/Kandinsky-5.0-I2V-Lite-5s",
        "Lite 2B image-to-video, 5 s",
        official_config="k5_lite_i2v_5s_sft_sd.yaml",
        mode="i2v",
    ),
    # ---- tiny debug models ---------------------------------------------------------------------------------
    _TINY,
    _variant(
        _TINY,
        "k5-tiny-i2v",
        mode="i2v",
        checkpoint="k5_tiny_i2v.safetensors",
        description="tiny random-weight image-to-video debug model",
    ),
]

TASKS: dict[str, TaskConfig] = {t.name: t for t in _TASK_LIST}


def task_names() -> list[str]:
    return list(TASKS)


def get_task(name: str) -> TaskConfig:
    """Look a task up by name; an unknown name raises with the list of valid ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None
