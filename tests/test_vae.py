"""VideoVAE on the tiny bundle VAE (real x8 / x4 compression): loading forms, layouts, frame rule, causality, tiling."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from kandinsky5.common import UserError
from kandinsky5.model.vae import SCALING_FACTOR, VideoVAE


@pytest.fixture(scope="module")
def vae(tiny_bundle) -> VideoVAE:
    return VideoVAE.load(tiny_bundle / "vae", dtype=torch.float32)


def _video(frames: int, size: int = 32, seed: int = 0, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=gen) * 2 - 1


def _state(v: VideoVAE) -> dict[str, torch.Tensor]:
    return v.vae.state_dict()


# -- loading ---------------------------------------------------------------------------------------------------


def test_dir_file_and_original_pt_load_identical_weights(tiny_bundle, tmp_path, vae):
    weights = tiny_bundle / "vae" / "diffusion_pytorch_model.safetensors"
    from_file = VideoVAE.load(weights, dtype=torch.float32)
    pt_dir = tmp_path / "orig"
    pt_dir.mkdir()
    shutil.copy(tiny_bundle / "vae" / "config.json", pt_dir / "config.json")
    torch.save({"state_dict": {f"vae.{k}": v for k, v in load_file(weights).items()}}, pt_dir / "pytorch_model.pt")
    from_pt = VideoVAE.load(pt_dir / "pytorch_model.pt", dtype=torch.float32)
    reference = load_file(weights)
    for loaded in (vae, from_file, from_pt):
        state = _state(loaded)
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k].float()) for k in reference)
    digests = {v.identity.split(":")[1] for v in (vae, from_file, from_pt)}
    assert len(digests) == 1 and vae.identity.startswith("vae:")


def test_lone_file_falls_back_to_standard_config_and_fails_strictly(tiny_bundle, tmp_path):
    lone = tmp_path / "diffusion_pytorch_model.safetensors"
    shutil.copy(tiny_bundle / "vae" / lone.name, lone)
    with pytest.raises(UserError, match="do not match its config") as err:
        VideoVAE.load(lone)  # tiny weights vs the standard (128, 256, 512, 512) HunyuanVideo config
    assert "\n" not in str(err.value) and "mis-shaped" in str(err.value)


@pytest.mark.parametrize(
    "name, match",
    [
        ("missing.safetensors", "does not exist"),
        ("empty_dir", "needs config.json"),
        ("bad.pt", "damaged or not a PyTorch checkpoint"),
    ],
)
def test_bad_paths_are_one_line_errors(tmp_path, name, match):
    target = tmp_path / name
    if name == "empty_dir":
        target.mkdir()
    elif name == "bad.pt":
        target.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=match) as err:
        VideoVAE.load(target)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "fp32"])
def test_dtypes(tiny_bundle, dtype):
    v = VideoVAE.load(tiny_bundle / "vae", dtype=dtype)
    assert v.dtype == (torch.float32 if dtype == "fp32" else dtype) and v.device == torch.device("cpu")
    z = v.encode(_video(1, 16))
    assert z.dtype == torch.float32 and z.shape == (1, 1, 2, 2, 16) and torch.isfinite(z).all()
    x = v.decode(z)
    assert x.dtype == torch.float32 and x.shape == (1, 3, 1, 16, 16)


# -- layouts and the 4k+1 rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("frames, latent", [(1, 1), (5, 2), (9, 3), (17, 5)])
def test_encode_decode_shapes(vae, frames, latent):
    z = vae.encode(_video(frames, 32, batch=2))
    assert z.shape == (2, latent, 4, 4, 16) and z.dtype == torch.float32
    x = vae.decode(z)
    assert x.shape == (2, 3, frames, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1


def test_latents_are_scaled_posterior_mode_in_dit_layout(vae):
    video = _video(5)
    raw = vae.vae.encode(video).latent_dist.mode()  # (B, C, T, h, w)
    torch.testing.assert_close(vae.encode(video), raw.permute(0, 2, 3, 4, 1) * SCALING_FACTOR)
    a = vae.encode(video, generator=torch.Generator().manual_seed(1), sample=True)
    b = vae.encode(video, generator=torch.Generator().manual_seed(1), sample=True)
    assert torch.equal(a, b) and not torch.allclose(a, vae.encode(video))


def test_decode_undoes_the_scaling(vae):
    z = torch.randn(1, 2, 4, 4, 16, generator=torch.Generator().manual_seed(0))
    ref = vae.vae.decode(z.permute(0, 4, 1, 2, 3) / SCALING_FACTOR).sample.clamp(-1, 1)
    torch.testing.assert_close(vae.decode(z), ref)


@pytest.mark.parametrize("frames", [2, 6, 16])
def test_frame_count_must_be_4k_plus_1(vae, frames):
    low = (frames - 1) // 4 * 4 + 1
    with pytest.raises(UserError, match=f"nearest valid: {low}, {low + 4}"):
        vae.encode(_video(frames, 16))


def test_bad_shapes(vae):
    with pytest.raises(UserError, match="divisible by 8"):
        vae.encode(torch.zeros(1, 3, 5, 20, 16))
    with pytest.raises(UserError, match=r"\(B, 3, F, H, W\)"):
        vae.encode(torch.zeros(3, 5, 16, 16))
    with pytest.raises(UserError, match=r"\(B, T, h, w, 16\)"):
        vae.decode(torch.zeros(1, 16, 2, 4, 4))


# -- causality -------------------------------------------------------------------------------------------------


def _framewise_group_norm(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm with statistics per frame for (B, C, T, H, W) inputs."""
    if x.ndim != 5:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
    b, c, t, h, w = x.shape
    y = F.group_norm(x.transpose(1, 2).reshape(b * t, c, h, w), self.num_groups, self.weight, self.bias, self.eps)
    return y.reshape(b, t, c, h, w).transpose(1, 2)


def _perturb_after_first_frame(video: torch.Tensor) -> torch.Tensor:
    noise = torch.randn(video[:, :, 1:].shape, generator=torch.Generator().manual_seed(7))
    out = video.clone()
    out[:, :, 1:] += 0.5 * noise
    return out


def test_latent_frame_0_is_causal_up_to_groupnorm_statistics(tiny_bundle, monkeypatch):
    """Convs and the block-causal attention are causal: with frame-local norms, pixel frames >= 1 cannot touch latent
    frame 0 (exact).  The real GroupNorms pool statistics over time, so there latent 0 moves, but far less."""
    video = _video(9)
    perturbed = _perturb_after_first_frame(video)

    real = VideoVAE.load(tiny_bundle / "vae", dtype=torch.float32)
    z, z_p = real.encode(video), real.encode(perturbed)
    first, rest = (z[:, 0] - z_p[:, 0]).abs().max(), (z[:, 1:] - z_p[:, 1:]).abs().max()
    assert 0 < first < rest  # real architecture: leaks through norm statistics only (random weights: a lot)

    local = VideoVAE.load(tiny_bundle / "vae", dtype=torch.float32)
    monkeypatch.setattr(nn.GroupNorm, "forward", _framewise_group_norm)
    for attn in local.vae.encoder.mid_block.attentions:
        monkeypatch.setattr(attn, "group_norm", None)  # its norm sees all frames' tokens at once
    z, z_p = local.encode(video), local.encode(perturbed)
    assert torch.equal(z[:, 0], z_p[:, 0]) and not torch.allclose(z[:, 1:], z_p[:, 1:])


# -- tiling / slicing ------------------------------------------------------------------------------------------


def _count_calls(monkeypatch, obj, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def test_tiled_decode_and_encode_match_untiled(tiny_bundle, monkeypatch):
    """32 px tiles, stride 16, on 64 px frames: tiling really runs (spied) and agrees with the plain path to 1e-4.

    Content is constant over space (varying over time and channels): then per-tile GroupNorm statistics and
    replicate padding equal the untiled ones, so any difference comes from the tiling plumbing (tile placement,
    blend weights, crop).  On random content a random-weight VAE differs by O(1) between tiles, as expected.
    """
    v = VideoVAE.load(tiny_bundle / "vae", dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(1, 2, 1, 1, 16, generator=gen).expand(1, 2, 8, 8, 16).contiguous()
    video = (torch.rand(1, 3, 5, 1, 1, generator=gen) * 2 - 1).expand(1, 3, 5, 64, 64).contiguous()
    plain_x, plain_z = v.decode(z), v.encode(video)

    v.enable_tiling(tile=32, stride=16)
    dec_calls = _count_calls(monkeypatch, v.vae, "tiled_decode")
    enc_calls = _count_calls(monkeypatch, v.vae, "tiled_encode")
    tiled_x, tiled_z = v.decode(z), v.encode(video)
    assert dec_calls and enc_calls
    torch.testing.assert_close(tiled_x, plain_x, atol=1e-4, rtol=0)
    torch.testing.assert_close(tiled_z, plain_z, atol=1e-4, rtol=0)
    assert plain_x.std() > 0.05  # not a trivially flat output


def test_load_switches_and_tile_validation(tiny_bundle):
    v = VideoVAE.load(tiny_bundle / "vae", dtype=torch.float32, tiling=True, slicing=True)
    assert v.vae.use_tiling and v.vae.use_slicing and v.vae.tile_sample_min_height == 256
    with pytest.raises(UserError, match="multiples of 8"):
        v.enable_tiling(tile=30)
    v.disable_tiling()
    assert not v.vae.use_tiling


def test_slicing_matches_batched(tiny_bundle, vae):
    sliced = VideoVAE.load(tiny_bundle / "vae", dtype=torch.float32, slicing=True)
    video = _video(5, 16, batch=2)
    torch.testing.assert_close(sliced.encode(video), vae.encode(video), atol=1e-5, rtol=0)


def test_bundle_config_keeps_real_compression(tiny_bundle):
    config = json.loads((tiny_bundle / "vae" / "config.json").read_text())
    assert config["latent_channels"] == 16 and config["scaling_factor"] == SCALING_FACTOR
    assert config["spatial_compression_ratio"] == 8 and config["temporal_compression_ratio"] == 4
