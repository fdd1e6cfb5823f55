"""Video generation: prompts -> text embeddings -> noise -> Euler/CFG denoising (T2V, I2V first / first+last) -> pixels.

Used by ``kandinsky5_generate_video.py`` and by the trainer's sample-during-training (``Kandinsky5Pipeline``:
text encoders and VAE loaded once and kept, the DiT passed in on every call).

Layouts
-------
=====================  ==========================  ==============================================================
tensor                 shape                       meaning
=====================  ==========================  ==============================================================
latents / noise        (B, T, h, w, 16) float32    channels-last DiT latents, T = (F-1)/4 + 1, h = H/8, w = W/8
DiT input              (B, T, h, w, 33)            [latents 16 | visual_cond 16 (always 0 here) | mask 1]
first / last latent    (B or 1, 1, h, w, 16)       clean image latent(s) from ``VideoVAE.encode`` of a 1-frame video
pixels                 (B, 3, F, H, W) in [-1, 1]  VAE output; ``video_io.to_uint8_frames`` makes uint8 frames
=====================  ==========================  ==============================================================

Sampler (official ``generation_utils.generate``; ``architecture.md`` 4.2-4.5)
-----------------------------------------------------------------------------
* Time grid: ``u_k = 1 - k/N`` (``linspace(1, 0, N+1)``), ``t_k = s*u_k / (1 + (s-1)*u_k)``, s = scheduler_scale;
  explicit Euler ``x <- x + (t_{k+1} - t_k) * v`` with the DiT time ``1000 * t_k``.
* CFG ``v = v_u + w (v_c - v_u)`` with the negative prompt; the unconditional pass is skipped when ``|w - 1| <=
  1e-6``.  Cond and uncond run as two DiT calls (as official) or as **one batched call** (both rows of x are the
  same, and texts of different lengths are right-padded with a key mask, which the DiT handles exactly), whichever
  ``cfg_batched`` picks for the device (measured rule; ``--cfg_mode`` forces one).
* I2V (official): before every step the noisy latent's frame 0 is overwritten with the clean image latent, the mask
  channel is 1 on frame 0 and the 16 cond channels stay zero; after the last step frame 0 is pasted again and
  ``normalize_first_frame`` renormalises latent frames 0-3 toward frames 4-8 (per-frame mean/std, reference
  statistics clamped).  Official code produces NaN when the video has 2-4 latent frames (empty reference);
  we skip the normalisation there.
* MagCache (``magcache.py``, ``Kandinsky5Pipeline(magcache=...)``): per step the loop asks the run for the DiT
  call's ``visual_blocks`` (cond stream 0, uncond stream 1), which runs or skips the visual blocks per stream.
* First+last (our extension; official and diffusers have no such mode, musubi's ``--image_last`` is a no-op): the
  same replacement and mask for the last latent frame.  The last-frame image is encoded as a 1-frame video, like
  the first, so its latent is a "single frame" latent placed where the VAE expects a 4-frame group.

Differences from official, on purpose: the initial noise is ``randn`` in fp32 from a CPU ``torch.Generator(seed +
i)`` for sample i (reproducible on every device; official draws bf16 noise on CUDA, which cannot be matched
bit-for-bit anyway); the sampler state stays fp32 (official keeps it in bf16); no prompt expansion by Qwen.
"""

from __future__ import annotations

import dataclasses
import gc
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kandinsky5.common import UserError, get_logger
from kandinsky5.configs import TaskConfig
from kandinsky5.memory.dtype_policy import FP8_DTYPE, FP32_PARAMS
from kandinsky5.model import flow
from kandinsky5.model.text_encoders import TextEmbeds, TextEncoder
from kandinsky5.model.vae import VideoVAE
from kandinsky5.sampling.guidance import CFG_MODES, cfg_batched, cfg_inputs, visual_tokens
from kandinsky5.sampling.guidance import cfg_text as _cfg_text  # noqa: F401 -- tests and bench use these names
from kandinsky5.sampling.guidance import velocity as _velocity
from kandinsky5.sampling.prompts import PromptLine, describe_frames, musubi_frames_hint
from kandinsky5.sampling.video_io import image_to_tensor, load_image, to_uint8_frames

__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "SamplingSpec",
    "GenerationRequest",
    "GenerationResult",
    "PreparedRequest",
    "check_request",
    "request_from_line",
    "Kandinsky5Pipeline",
    "sample_latents",
    "CFG_MODES",
    "cfg_batched",
    "initial_noise",
    "dit_input",
    "normalize_first_frame",
    "i2v_size",
    "fit_image",
    "text_template",
    "valid_frames_hint",
]

log = get_logger(__name__)

# Official default negative prompt (architecture.md 3.1; musubi's is "low quality, bad quality").
DEFAULT_NEGATIVE_PROMPT = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, deformed, "
    "walking backwards"
)
SIZE_MULTIPLE = 16  # VAE x8 times DiT patch 2


def valid_frames_hint(frames: int) -> str:
    """'nearest valid: 13, 17' for a frame count that is not 4k+1."""
    low = max(1, (frames - 1) // 4 * 4 + 1)
    return f"nearest valid: {low}, {low + 4}" if low != frames else ""


@dataclass(frozen=True)
class SamplingSpec:
    """Everything that determines one sampled video besides the model, the text and the conditioning images."""

    width: int  # pixels, multiple of 16
    height: int  # pixels, multiple of 16
    frames: int  # VIDEO frames, 4k+1 (1 = an image)
    steps: int
    guidance: float
    scheduler_scale: float
    seed: int
    rope_scale: tuple[float, float, float] = (1.0, 2.0, 2.0)

    def __post_init__(self) -> None:
        if self.frames < 1 or (self.frames - 1) % 4:
            raise UserError(f"--frames must be 4k+1 video frames (1, 5, 9, ..., 121); got {self.frames}, "
                            f"{valid_frames_hint(self.frames)}")  # fmt: skip
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
                raise UserError(f"--{name} must be a positive multiple of {SIZE_MULTIPLE}, got {value}")
        if self.steps < 1:
            raise UserError(f"--steps must be >= 1, got {self.steps}")
        if not 0 < self.scheduler_scale < math.inf:
            raise UserError(f"--scheduler_scale must be positive, got {self.scheduler_scale}")
        if not math.isfinite(self.guidance):
            raise UserError(f"--guidance must be a finite number, got {self.guidance}")

    @classmethod
    def from_task(cls, task: TaskConfig, seed: int = 42, **overrides) -> SamplingSpec:
        """Task defaults with the non-None ``overrides`` applied."""
        base = dict(
            width=task.width,
            height=task.height,
            frames=task.frames,
            steps=task.steps,
            guidance=task.guidance,
            scheduler_scale=task.scheduler_scale,
            rope_scale=tuple(task.rope_scale),
        )
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(seed=seed, **base)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(T, h, w, 16) of one sample."""
        return (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8, 16

    def metadata(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)}


def text_template(frames: int) -> str:
    """Official rule: the ``image`` Qwen template for a single frame, ``video`` otherwise."""
    return "image" if frames == 1 else "video"


# ----------------------------------------------------------------------------------------------------------------
# sampler
# ----------------------------------------------------------------------------------------------------------------


def initial_noise(spec: SamplingSpec, batch: int = 1) -> torch.Tensor:
    """(B, T, h, w, 16) fp32 N(0, 1) on the CPU; sample i uses ``torch.Generator().manual_seed(seed + i)``."""
    gens = [torch.Generator().manual_seed(spec.seed + i) for i in range(batch)]
    return torch.stack([torch.randn(spec.latent_shape, generator=g) for g in gens])


def dit_input(x: torch.Tensor, first: bool, last: bool) -> torch.Tensor:
    """(B, T, h, w, 16) -> (B, T, h, w, 33): latents, zero cond channels, mask = 1 on the conditioned frames."""
    mask = torch.zeros((*x.shape[:-1], 1), dtype=x.dtype, device=x.device)
    if first:
        mask[:, 0] = 1
    if last:
        mask[:, -1] = 1
    return torch.cat([x, torch.zeros_like(x), mask], dim=-1)


def paste_condition(x: torch.Tensor, first: torch.Tensor | None, last: torch.Tensor | None) -> torch.Tensor:
    """Overwrite frame 0 / frame T-1 of x (B, T, h, w, 16) in place with the clean latents (B, 1, h, w, 16).

    With :func:`dit_input` this is the one definition of I2V conditioning, shared by sampling and training."""
    if first is not None:
        x[:, :1] = first
    if last is not None:
        x[:, -1:] = last
    return x


def normalize_first_frame(latents: torch.Tensor, reference_frames: int = 5) -> torch.Tensor:
    """Official ``normalize_first_frame`` per sample of (B, T, h, w, C); skipped (returned as is) when T <= 4.

    Frames 0-3 are renormalised ``(x - mu_s) / sd_s * sd_r + mu_r`` with per-frame source statistics (over h, w, C)
    and the reference statistics of frames 4 .. 4+min(5, T-1) (joint), clamped to [mu_s - 0.05, mu_s + 0.1] and
    [sd_s - 0.1, sd_s + 0.25]; std is the unbiased one, as ``torch.std``.
    """
    if latents.shape[1] <= 4:
        return latents
    out = latents.clone()
    source = out[:, :4]
    reference = out[:, 4 : 4 + min(reference_frames, out.shape[1] - 1)]
    src_mean = source.mean(dim=(2, 3, 4), keepdim=True)
    src_std = source.std(dim=(2, 3, 4), keepdim=True)
    ref_flat = reference.flatten(1)
    ref_mean = ref_flat.mean(dim=1).view(-1, 1, 1, 1, 1)
    ref_std = ref_flat.std(dim=1).view(-1, 1, 1, 1, 1)
    ref_mean = torch.clamp(ref_mean, src_mean - 0.05, src_mean + 0.1)
    ref_std = torch.clamp(ref_std, src_std - 0.1, src_std + 0.25)
    out[:, :4] = (source - src_mean) / src_std * ref_std + ref_mean
    return out


def _placement(dit: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and compute dtype of the DiT: the dtype of its first weight that the dtype policy stores in the run
    dtype (fp8 layers dequantise themselves; time/modulation weights keep the checkpoint's precision and compute in
    fp32, so neither says what the run dtype is)."""
    params = list(dit.named_parameters())
    run = [p for n, p in params if p.dtype != FP8_DTYPE and not FP32_PARAMS.search(n)]
    first = (run or [p for _, p in params])[0]
    return first.device, first.dtype


@torch.no_grad()
def sample_latents(
    dit,
    cond: TextEmbeds,
    uncond: TextEmbeds | None,
    spec: SamplingSpec,
    first_latent: torch.Tensor | None = None,
    last_latent: torch.Tensor | None = None,
    progress: bool = True,
    *,
    noise: torch.Tensor | None = None,
    cfg_mode: str = "auto",
    cache=None,
) -> torch.Tensor:
    """Denoise ``initial_noise(spec, len(cond))`` (or ``noise``) -> (B, T, h, w, 16) fp32 latents on the CPU.

    ``dit(x, text_embed, text_mask, pooled, time, scale_factor)`` is any module with the DiT's signature; its device
    and compute dtype are read from its parameters.  ``uncond`` may hold one row (shared) or one per prompt; it is
    unused when ``|guidance - 1| <= 1e-6``.  ``cfg_mode``: see :func:`cfg_batched`.  ``cache``: a
    ``MagCacheConfig.start`` (or calibration) run for this video, or None; it needs the DiT's ``visual_blocks``
    argument.
    """
    device, dtype = _placement(dit)
    x = (initial_noise(spec, len(cond)) if noise is None else noise.float()).to(device)
    first = None if first_latent is None else first_latent.to(device, torch.float32)
    last = None if last_latent is None else last_latent.to(device, torch.float32)
    if last is not None and x.shape[1] < 3:
        raise ValueError("a last-frame latent needs at least 3 latent frames (9 video frames)")
    batched = cfg_batched(cfg_mode, device, visual_tokens(x))
    text = cfg_inputs(cond, uncond, spec.guidance, batched, device, dtype)
    sigmas = flow.sampling_sigmas(spec.steps, spec.scheduler_scale)
    visual_cond = dit.config.visual_cond
    for k in tqdm(range(spec.steps), desc="denoising", disable=not progress, leave=False):
        paste_condition(x, first, last)
        model_in = dit_input(x, first is not None, last is not None) if visual_cond else x
        v = _velocity(dit, model_in, text, sigmas[k], spec, dtype, cache, k)
        x = flow.euler_step(x, v, sigmas[k], sigmas[k + 1])
    if cache is not None:
        cache.finish()
    paste_condition(x, first, last)
    if first is not None:
        x = normalize_first_frame(x)
    return x.cpu()


# ----------------------------------------------------------------------------------------------------------------
# image conditioning
# ----------------------------------------------------------------------------------------------------------------


def i2v_size(width: int, height: int, max_area: int, divisibility: int) -> tuple[int, int]:
    """Official output size for an image (newest ``i2v_pipeline.resize_image``): scale to area ~ ``max_area``
    keeping the aspect ratio, round each side to a multiple of ``divisibility`` (at least one)."""
    k = (max_area / (width * height)) ** 0.5
    new_w = max(divisibility, round(width * k / divisibility) * divisibility)
    new_h = max(divisibility, round(height * k / divisibility) * divisibility)
    return new_w, new_h


def fit_image(image, width: int, height: int, crop: bool):
    """Resize a PIL image to (width, height): plainly (official, tiny aspect change from rounding) or, with ``crop``,
    scaled to cover the box and center-cropped (no distortion).  Bilinear with antialiasing, like torchvision."""
    from PIL import Image

    if not crop:
        return image.resize((width, height), Image.Resampling.BILINEAR)
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    scaled = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return scaled.crop((left, top, left + width, top + height))


# ----------------------------------------------------------------------------------------------------------------
# pipeline
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """One video to generate.  With ``image`` and ``fit_to_image`` the output size follows the image (official
    I2V rule) and ``spec.width/height`` are replaced; without ``fit_to_image`` the image is resized and
    center-cropped to ``spec``'s size."""

    prompt: str
    spec: SamplingSpec
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    image: str | Path | None = None
    image_last: str | Path | None = None
    fit_to_image: bool = True
    fps: float = 24
    extra_metadata: dict[str, str] = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        meta = {"prompt": self.prompt, "negative_prompt": self.negative_prompt, **self.spec.metadata()}
        meta.update(fps=str(self.fps), noise="cpu torch.Generator(seed), fp32", sampler="euler, official grid")
        if self.image is not None:
            meta["image"] = str(self.image)
        if self.image_last is not None:
            meta["image_last"] = str(self.image_last)
        return {**meta, **self.extra_metadata}


@dataclass
class GenerationResult:
    request: GenerationRequest  # with the final spec (I2V: the size taken from the image)
    latents: torch.Tensor  # (1, T, h, w, 16) fp32, CPU
    frames: np.ndarray | None  # (F, H, W, 3) uint8, None when not decoded

    @property
    def metadata(self) -> dict[str, str]:
        return self.request.metadata()


def request_from_line(task: TaskConfig, line: PromptLine, **defaults) -> GenerationRequest:
    """A request from a prompt line: task defaults < ``defaults`` (e.g. command-line values; None = unset) < the
    line's own ``--w --h --f --d --s --g --n --i --l``.  Keys: the ``SamplingSpec`` fields except ``rope_scale``,
    plus ``negative_prompt``, ``image``, ``image_last``, ``fps``, ``extra_metadata``.  The trainer's sampling and
    the generate script both build their requests here."""
    try:
        r = _request_from_line(task, line, defaults)
    except UserError as exc:  # prompt-file errors name file:line (and musubi's latent-frame count, if it may be one)
        hint = f"; note: {musubi_frames_hint(line.frames)}" if "--frames" in str(exc) and line.frames else ""
        raise UserError(f"{line.source}: {exc}{hint}" if line.source else str(exc)) from None
    log.info("%s: %s, %dx%d, %d steps, guidance %g, seed %d", line.source or "prompt", describe_frames(r.spec.frames),
             r.spec.width, r.spec.height, r.spec.steps, r.spec.guidance, r.spec.seed)  # fmt: skip
    return r


def _request_from_line(task: TaskConfig, line: PromptLine, defaults: dict) -> GenerationRequest:
    values = {k: v for k, v in defaults.items() if v is not None}
    values.update(line.overrides())
    image = values.pop("image", None)
    if image is not None and ("width" in values) != ("height" in values):
        raise UserError("with an input image give both width and height (crop to that size) or neither")
    request = GenerationRequest(
        prompt=line.prompt,
        negative_prompt=values.pop("negative_prompt", DEFAULT_NEGATIVE_PROMPT),
        image=image,
        image_last=values.pop("image_last", None),
        fit_to_image="width" not in values,
        fps=values.pop("fps", task.fps),
        extra_metadata=values.pop("extra_metadata", {}),
        spec=SamplingSpec.from_task(task, seed=values.pop("seed", 42), **values),
    )
    check_request(task, request)
    return request


@dataclass
class PreparedRequest:
    """A request with its final spec and the clean conditioning latents (1, 1, h, w, 16), if any."""

    request: GenerationRequest
    first: torch.Tensor | None = None
    last: torch.Tensor | None = None


def check_request(task: TaskConfig, request: GenerationRequest) -> None:
    """Conditioning rules that need no model: I2V tasks need an image, a last image needs a first one."""
    if task.is_i2v and request.image is None:
        raise UserError(f"task {task.name} is image-to-video: pass an input image with --image (--i)")
    if request.image_last is not None and request.image is None:
        raise UserError("--image_last needs --image too (first+last frame conditioning)")
    if request.image_last is not None and request.spec.frames < 9:
        raise UserError(
            f"--image_last needs at least 9 video frames (3 latent frames: first, generated, last); got "
            f"{request.spec.frames}"
        )
    for what, path in (("--image", request.image), ("--image_last", request.image_last)):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{what} {path} does not exist")


class Kandinsky5Pipeline:
    """Text encoders + VAE for one task, loaded lazily and kept; the DiT is passed to every ``generate`` call.

    Memory order for a run: ``encode_prompts`` (text encoders) -> ``release_text_encoder`` -> image latents (VAE)
    -> sampling (DiT) -> ``offload_dit`` moves the DiT to the CPU while the VAE decodes, if asked.
    """

    def __init__(
        self,
        task: TaskConfig,
        *,
        text_encoder_qwen: str | None = None,
        text_encoder_clip: str | None = None,
        vae_path: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        qwen_4bit: bool = False,
        vae_tiling: bool = False,
        cfg_mode: str = "auto",
        magcache=None,
        vae_dtype: torch.dtype | None = None,
    ):
        self.task = task
        self.cfg_mode = cfg_mode  # see cfg_batched
        self.magcache = magcache  # MagCacheConfig / magcache.Calibrator (anything with .start(steps, cfg)) or None
        self.device, self.dtype = torch.device(device), dtype
        self.vae_dtype = vae_dtype or dtype
        self._paths = {"qwen": text_encoder_qwen, "clip": text_encoder_clip, "vae": vae_path}
        self._qwen_4bit, self._vae_tiling = qwen_4bit, vae_tiling
        self.text_encoder: TextEncoder | None = None
        self.vae: VideoVAE | None = None
        self.text_cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- text ------------------------------------------------------------------------------------------------------

    def _load_text_encoder(self) -> TextEncoder:
        if self.text_encoder is None:
            if not (self._paths["qwen"] and self._paths["clip"]):
                raise UserError("prompts need --text_encoder_qwen and --text_encoder_clip")
            log.info("loading text encoders (%s, %s) on %s", self._paths["qwen"], self._paths["clip"], self.device)
            self.text_encoder = TextEncoder.load(
                self._paths["qwen"], self._paths["clip"], self.device, self.dtype, qwen_4bit=self._qwen_4bit
            )
        return self.text_encoder

    def encode_prompts(self, requests: Iterable[GenerationRequest], batch_size: int = 8) -> None:
        """Encode every prompt and negative prompt not cached yet (CPU copies kept in ``text_cache``)."""
        wanted: dict[str, list[str]] = {}
        for r in requests:
            template = text_template(r.spec.frames)
            texts = [r.prompt] + ([r.negative_prompt] if flow.needs_uncond(r.spec.guidance) else [])
            for text in texts:
                if (text, template) not in self.text_cache and text not in wanted.setdefault(template, []):
                    wanted[template].append(text)
        for template, texts in wanted.items():
            for start in range(0, len(texts), batch_size):
                chunk = texts[start : start + batch_size]
                out = self._load_text_encoder().encode(chunk, template, self.task.text_max_length)
                for i, text in enumerate(chunk):
                    emb, pooled = out.unpadded(i)
                    self.text_cache[(text, template)] = (emb.float().cpu(), pooled.float().cpu())

    def embeds(self, texts: list[str], template: str) -> TextEmbeds:
        """Cached prompts as one padded batch (encode them first)."""
        missing = [t for t in texts if (t, template) not in self.text_cache]
        if missing:
            raise KeyError(f"prompt not encoded yet: {missing[0]!r}; call encode_prompts first")
        return TextEmbeds.pad_stack([self.text_cache[(t, template)] for t in texts])

    def release_text_encoder(self) -> None:
        """Delete the text encoders (the cache of embeddings stays)."""
        self.text_encoder = None
        _free_memory()

    # -- VAE -------------------------------------------------------------------------------------------------------

    def _load_vae(self) -> VideoVAE:
        if self.vae is None:
            if not self._paths["vae"]:
                raise UserError("--vae is required (image conditioning and decoding use it)")
            log.info("loading VAE %s on %s (%s)", self._paths["vae"], self.device, self.vae_dtype)
            self.vae = VideoVAE.load(self._paths["vae"], self.device, self.vae_dtype, tiling=self._vae_tiling)
        return self.vae

    def encode_image(self, path: str | Path, width: int, height: int, crop: bool, what: str) -> torch.Tensor:
        """Image file -> (1, 1, h, w, 16) clean latent (posterior mode; official draws a posterior sample)."""
        image = fit_image(load_image(path, what), width, height, crop)
        return self._load_vae().encode(image_to_tensor(image)).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """(B, T, h, w, 16) -> one (F, H, W, 3) uint8 array per sample."""
        return to_uint8_frames(self._load_vae().decode(latents))

    # -- generation ------------------------------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest | PreparedRequest) -> PreparedRequest:
        """Check the request against the task, resolve the I2V size and encode the conditioning image(s)."""
        if isinstance(request, PreparedRequest):
            return request
        check_request(self.task, request)
        if request.image is None:
            return PreparedRequest(request)
        if not self.task.is_i2v:
            log.warning("task %s is text-to-video; conditioning it on an image is outside its training", self.task.name)
        spec = request.spec
        if request.fit_to_image:
            img = load_image(request.image, "--image")
            w, h = i2v_size(img.width, img.height, self.task.i2v_max_area, self.task.i2v_divisibility)
            spec = dataclasses.replace(spec, width=w, height=h)
            request = dataclasses.replace(request, spec=spec)
        crop = not request.fit_to_image
        first = self.encode_image(request.image, spec.width, spec.height, crop, "--image")
        last = None
        if request.image_last is not None:
            last = self.encode_image(request.image_last, spec.width, spec.height, True, "--image_last")
        return PreparedRequest(request, first, last)

    def sample(self, dit, prepared: PreparedRequest, progress: bool = True) -> torch.Tensor:
        """Latents (1, T, h, w, 16) for one prepared request (prompts must be encoded)."""
        r = prepared.request
        template = text_template(r.spec.frames)
        self.encode_prompts([r])
        cond = self.embeds([r.prompt], template)
        uncond = self.embeds([r.negative_prompt], template) if flow.needs_uncond(r.spec.guidance) else None
        cache = None if self.magcache is None else self.magcache.start(r.spec.steps, uncond is not None)
        return sample_latents(
            dit, cond, uncond, r.spec, prepared.first, prepared.last, progress, cfg_mode=self.cfg_mode, cache=cache
        )

    def generate_iter(
        self,
        dit,
        requests: Iterable[GenerationRequest | PreparedRequest],
        *,
        decode: bool = True,
        offload_dit: bool = False,
        restore: bool = True,
        progress: bool = True,
    ) -> Iterator[GenerationResult]:
        """Prepare the requests (encode images up front), then sample + decode them one by one, yielding results.

        ``offload_dit``: the DiT goes to the CPU for each decode and comes back for the next sample (and at the end
        when ``restore``; a caller that drops the DiT afterwards passes ``restore=False``).
        """
        prepared = [self.prepare(r) for r in requests]
        self.encode_prompts(p.request for p in prepared)
        device, _ = _placement(dit)
        offloaded = False
        for item in prepared:
            if offloaded:
                _restore(dit, device)
                offloaded = False
            latents = self.sample(dit, item, progress)
            frames = None
            if decode:
                if offload_dit:
                    _offload(dit)
                    offloaded = True
                frames = self.decode(latents)[0]
            yield GenerationResult(item.request, latents, frames)
        if offloaded and restore:
            _restore(dit, device)

    def generate(
        self, dit, requests: Iterable[GenerationRequest | PreparedRequest], **kwargs
    ) -> list[GenerationResult]:
        """``list(generate_iter(...))`` -- what the trainer's sample-during-training calls."""
        return list(self.generate_iter(dit, requests, **kwargs))


def _offload(dit) -> None:
    from kandinsky5.memory.build import offload_dit

    offload_dit(dit)
    _free_memory()


def _restore(dit, device: torch.device) -> None:
    from kandinsky5.memory.build import restore_dit

    restore_dit(dit, device)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
