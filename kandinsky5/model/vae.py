"""HunyuanVideo 3D causal VAE adapter (``architecture.md`` 4.4 and 5), over diffusers' ``AutoencoderKLHunyuanVideo``.

Layouts
-------
==================  ============================  ===============================================================
tensor              shape                         meaning
==================  ============================  ===============================================================
pixels (in / out)   (B, 3, F, H, W) in [-1, 1]    F = 4k + 1 frames, H and W multiples of 8
VAE latents         (B, 16, T, H/8, W/8)          diffusers layout, unscaled (internal only)
DiT latents         (B, T, H/8, W/8, 16) float32  channels-last, ``z_dit = z_vae * SCALING_FACTOR``
==================  ============================  ===============================================================

``T = (F - 1) / 4 + 1``: the first pixel frame has its own latent frame.  Every conv is causal (padded only at
the front in time) and the mid-block attention is block-causal, but the GroupNorms (resnets and the attention's
input norm) take their statistics over all frames, as in the original HunyuanVideo code.  So latent frame 0 depends
on later pixel frames *only through those statistics*: it is close to, not equal to, the latent of frame 0 encoded
alone.  (``tests/test_vae.py`` checks exact causality with frame-local norms and documents the real behaviour.)

Accepted weights: a diffusers directory (``config.json`` + ``diffusion_pytorch_model.safetensors``), that
safetensors file on its own (``config.json`` beside it, else the standard HunyuanVideo config), or the original
``pytorch_model.pt`` (a state dict, possibly under ``"state_dict"`` and/or with a ``"vae."`` prefix; same parameter
names as diffusers).  Loading is strict: any missing, unexpected or mis-shaped tensor is a one-line error.

Memory switches map to diffusers: ``tiling`` -> ``enable_tiling()`` (spatial tiles, 256 px with stride 192 unless
``enable_tiling(tile, stride)`` says otherwise), ``slicing`` -> ``enable_slicing()`` (one sample at a time).
diffusers' frame-wise temporal windows (16 pixel / 4 latent frames, stride 12 / 3) stay on, as upstream.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from kandinsky5.common import UserError, parse_dtype
from kandinsky5.files import load_safetensors, load_torch, read_safetensors_header

__all__ = ["SCALING_FACTOR", "VideoVAE", "vae_file_identity"]

SCALING_FACTOR = 0.476986
LATENT_CHANNELS = 16
_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_PT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


# --------------------------------------------------------------------------------------------------------------
# Reading config + state dict from the three on-disk forms
# --------------------------------------------------------------------------------------------------------------


def _read_config(config_path: Path) -> dict:
    """config.json beside the weights, or {} (= the class defaults, which are the standard HunyuanVideo VAE)."""
    if not config_path.is_file():
        return {}
    try:
        return json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"VAE: cannot read {config_path}: {exc}") from None


def _read_pt(path: Path) -> dict[str, torch.Tensor]:
    """Original checkpoint: unwrap ``state_dict`` and strip a ``vae.`` prefix."""
    state = load_torch(path, "--vae")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"VAE: {path} does not hold a state dict (found {type(state).__name__})")
    return {k.removeprefix("vae."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        weights = path / _WEIGHTS_NAME
        if not (path / "config.json").is_file() or not weights.is_file():
            raise UserError(f"VAE: directory {path} needs config.json and {_WEIGHTS_NAME}")
        path = weights
    if not path.is_file():
        raise UserError(f"VAE: {path} does not exist; pass a diffusers VAE dir, a .safetensors or a .pt file")
    return path


def _read_weights(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) from a diffusers dir, a safetensors file or an original .pt file."""
    path = _weights_file(path)
    config = _read_config(path.parent / "config.json")
    if path.suffix in _PT_SUFFIXES:
        return config, _read_pt(path)
    return config, load_safetensors(path, "--vae")[0]


def vae_file_identity(path: str | Path) -> str:
    """``VideoVAE.identity`` of the weights at ``path`` without building the model (safetensors: header only)."""
    source = Path(path)
    weights = _weights_file(source)
    config = _read_config(weights.parent / "config.json")
    if weights.suffix in _PT_SUFFIXES:
        return _identity(source, config, _read_pt(weights))
    shapes = read_safetensors_header(weights, "--vae").shapes()
    return _identity(source, config, {k: torch.empty(v, device="meta") for k, v in shapes.items()})


def _check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Strict key and shape check with a one-line report."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = [
            f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong))
            if keys
        ]
        raise UserError(f"VAE weights in {source} do not match its config: {'; '.join(parts)}")


def _identity(source: Path, config: dict, state: dict[str, torch.Tensor]) -> str:
    """``<file name>:<12 hex>`` over the config and the (key, shape) list -- stable across copies and dtypes."""
    public_config = {k: v for k, v in sorted(config.items()) if not k.startswith("_")}
    shapes = sorted((k, list(v.shape)) for k, v in state.items())
    digest = hashlib.sha256(json.dumps([public_config, shapes], sort_keys=True).encode()).hexdigest()[:12]
    return f"{source.name}:{digest}"


# --------------------------------------------------------------------------------------------------------------
# Adapter
# --------------------------------------------------------------------------------------------------------------


class VideoVAE:
    """Encode pixels to DiT-layout latents and back; build it with ``VideoVAE.load``."""

    def __init__(self, vae, identity: str):
        self.vae = vae  # diffusers AutoencoderKLHunyuanVideo
        self._identity = identity

    @classmethod
    def load(
        cls,
        path: str,
        device="cpu",
        dtype=torch.float16,
        tiling: bool = False,
        slicing: bool = False,
    ) -> VideoVAE:
        """Strictly load weights in any of the accepted forms (module docstring) and move them to device/dtype."""
        from diffusers import AutoencoderKLHunyuanVideo

        source = Path(path)
        config, state = _read_weights(source)
        try:
            with torch.device("meta"):
                model = AutoencoderKLHunyuanVideo.from_config(config)
        except (TypeError, ValueError) as exc:
            raise UserError(f"VAE: config of {source} is not a HunyuanVideo VAE config: {exc}") from None
        _check_state(model, state, source)
        identity = _identity(source, config, state)
        dtype = parse_dtype(dtype)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        model.requires_grad_(False).eval()
        vae = cls(model, identity).to(device)
        if tiling:
            vae.enable_tiling()
        if slicing:
            model.enable_slicing()
        return vae

    # -- placement / switches -------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def identity(self) -> str:
        return self._identity

    def to(self, device=None, dtype=None) -> VideoVAE:
        """Move and/or cast (only the given arguments reach diffusers, which warns about any explicit dtype)."""
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if "dtype" in kwargs:
            kwargs["dtype"] = parse_dtype(kwargs["dtype"])
        self.vae.to(**kwargs)
        return self

    def enable_tiling(self, tile: int = 256, stride: int = 192) -> None:
        """Spatial tiling in pixels (diffusers blends ``tile - stride`` pixels between neighbouring tiles)."""
        if tile % 8 or stride % 8 or not 0 < stride <= tile:
            raise UserError(f"VAE tile {tile} / stride {stride} must be multiples of 8 with 0 < stride <= tile")
        self.vae.enable_tiling(
            tile_sample_min_height=tile,
            tile_sample_min_width=tile,
            tile_sample_stride_height=stride,
            tile_sample_stride_width=stride,
        )

    def disable_tiling(self) -> None:
        self.vae.disable_tiling()

    # -- encode / decode ------------------------------------------------------------------------------------------

    def _check_video(self, video: torch.Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise UserError(f"VAE encode expects (B, 3, F, H, W) pixels, got shape {tuple(video.shape)}")
        frames, height, width = video.shape[2:]
        if (frames - 1) % 4:
            low = max(1, (frames - 1) // 4 * 4 + 1)
            raise UserError(f"VAE needs 4k+1 frames (1, 5, 9, 13, ...); got {frames}, nearest valid: {low}, {low + 4}")
        if height % 8 or width % 8:
            raise UserError(f"VAE needs height and width divisible by 8, got {height}x{width}")

    @torch.no_grad()
    def encode(
        self, video: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """(B, 3, 4k+1, H, W) in [-1, 1] -> (B, k+1, H/8, W/8, 16) float32, scaled (posterior mode unless sample)."""
        self._check_video(video)
        posterior = self.vae.encode(video.to(self.device, self.dtype)).latent_dist
        z = posterior.sample(generator=generator) if sample else posterior.mode()
        return (z.float() * SCALING_FACTOR).permute(0, 2, 3, 4, 1).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, T, h, w, 16) DiT latents -> (B, 3, 4(T-1)+1, 8h, 8w) float32 pixels clamped to [-1, 1]."""
        if latents.ndim != 5 or latents.shape[-1] != LATENT_CHANNELS:
            raise UserError(f"VAE decode expects (B, T, h, w, 16) latents, got shape {tuple(latents.shape)}")
        z = (latents.float() / SCALING_FACTOR).permute(0, 4, 1, 2, 3).to(self.device, self.dtype)
        return self.vae.decode(z).sample.float().clamp_(-1.0, 1.0)
