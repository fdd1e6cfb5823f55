"""The flow-matching objective of LoRA training (``architecture.md`` 4.1; t = 1 noise, t = 0 data)::

    x_t    = (1 - t) * x0 + t * eps                  flow.noisy_input
    target = eps - x0                                flow.velocity_target
    v      = DiT([x_t | cond | mask], text, 1000 * t)
    loss   = mean over unconditioned frames of w * (v - target)^2, in fp32    (w = 1, or musubi's per-sample
                                                                             sigma_sqrt / cosmap weight)

Layouts: latents ``x0``, ``eps``, ``x_t``, ``v`` are ``(B, T, h, w, 16)`` channels-last; the DiT input is
``(B, T, h, w, 33)`` = noisy latents | 16 cond channels | 1 mask channel; ``t`` is ``(B,)``; text is ``(B, L, D)`` with
a ``(B, L)`` bool mask (right-padded, one copy per sample), pooled CLIP ``(B, Dc)``; ``latents_image`` is
``(B, 2, h, w, 16)`` = [first, last] clean frame latents.

I2V conditioning follows official inference (``architecture.md`` 4.5), not musubi (defects #4, #5): the clean image
latent *replaces* frame 0 of the noisy input (and frame T-1 with ``first_last``), the mask channel is 1 on exactly
those frames, the cond channels stay zero, and the conditioned frames are left out of the loss (inference overwrites
them, so there is nothing to learn there).  ``first`` conditions frame 0 when T >= 2; ``first_last`` also frame T-1
when T >= 3; a 1-frame item (an image) is trained unconditioned.  T2V: ``[x_t | 0 | 0]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kandinsky5.common import get_logger
from kandinsky5.model import flow
from kandinsky5.sampling import pipeline
from kandinsky5.train.config import I2V_MODES

if TYPE_CHECKING:
    pass


log = get_logger(__name__)


@dataclass
class TrainBatch:
    latents: torch.Tensor  # x0 (B, T, h, w, 16) fp32
    text_embeds: torch.Tensor  # (B, L, D)
    text_mask: torch.Tensor  # (B, L) bool
    pooled: torch.Tensor  # (B, Dc)
    latents_image: torch.Tensor | None = None  # (B, 2, h, w, 16): [first, last]; I2V tasks only


def batch_to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> TrainBatch:
    """Collated cache tensors -> fp32 tensors on ``device`` (autocast takes the DiT's matmuls to bf16)."""

    def f32(t):
        return None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=True)

    return TrainBatch(
        latents=f32(batch["latents"]),
        text_embeds=f32(batch["text_embeds"]),
        text_mask=batch["text_mask"].to(device),
        pooled=f32(batch["pooled"]),
        latents_image=f32(batch.get("latents_image")),
    )


def conditioned_frames(num_frames: int, i2v_mode: str) -> list[int]:
    """Latent frames that carry a clean image latent: [0] (first, T >= 2), [0, T-1] (first_last, T >= 3)."""
    if i2v_mode not in I2V_MODES:
        raise ValueError(f"i2v_mode must be one of {I2V_MODES}, got {i2v_mode!r}")
    if num_frames < 2:
        return []
    return [0, num_frames - 1] if i2v_mode == "first_last" and num_frames >= 3 else [0]


def dit_input(
    x_t: torch.Tensor, latents_image: torch.Tensor | None, i2v_mode: str = "first"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The 33-channel DiT input and the (B, T) loss weight of each frame (None = every frame counts).

    ``latents_image`` None -> T2V ``[x_t | 0 | 0]``.  Otherwise the official I2V layout, built with the sampler's own
    :func:`~kandinsky5.sampling.pipeline.paste_condition` and :func:`~kandinsky5.sampling.pipeline.dit_input`,
    so training conditions exactly as inference does; the conditioned frames get loss weight 0.
    """
    b, t = x_t.shape[:2]
    frames = conditioned_frames(t, i2v_mode) if latents_image is not None else []
    if not frames:
        return pipeline.dit_input(x_t, first=False, last=False), None
    last = latents_image[:, 1:2] if len(frames) == 2 else None  # frame T-1 <- the last-frame latent
    x_in = pipeline.paste_condition(x_t.clone(), latents_image[:, :1], last)
    weight = torch.ones(b, t, dtype=torch.float32, device=x_t.device)
    weight[:, frames] = 0.0
    return pipeline.dit_input(x_in, first=True, last=last is not None), weight


def masked_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    frame_weight: torch.Tensor | None,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of (pred - target)^2 in fp32 over the frames whose weight is 1 (all frames when None); with
    ``sample_weight`` (B,) each sample's squared errors are multiplied by its weight first (musubi's loss weighting:
    the mean of w * err, with the same denominator)."""
    err = (pred.float() - target.float()).square()
    if sample_weight is not None:
        err = err * sample_weight.float().view(-1, *([1] * (err.ndim - 1)))
    if frame_weight is None:
        return err.mean()
    w = frame_weight.view(*frame_weight.shape, 1, 1, 1)
    per_frame = err[0, 0].numel()
    return (err * w).sum() / (w.sum() * per_frame)


def flow_matching_loss(
    dit: Callable[..., torch.Tensor],
    batch: TrainBatch,
    t: torch.Tensor,
    noise: torch.Tensor,
    rope_scale: Sequence[float],
    i2v_mode: str = "first",
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The rectified-flow loss of one batch (see the module docstring); ``t`` (B,), ``noise`` like the latents,
    ``sample_weight`` (B,) or None (``flow.loss_weight``)."""
    x0 = batch.latents
    x_t = flow.noisy_input(x0, noise, t)  # (1 - t) x0 + t eps
    target = flow.velocity_target(x0, noise)  # eps - x0
    x_in, frame_weight = dit_input(x_t, batch.latents_image, i2v_mode)
    v = dit(x_in, batch.text_embeds, batch.text_mask, batch.pooled, flow.dit_time(t), scale_factor=tuple(rope_scale))
    return masked_mse(v, target, frame_weight, sample_weight)
