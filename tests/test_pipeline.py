"""Sampler, I2V conditioning, prompt-line parsing and media I/O (no model files needed; tiny DiT in fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kandinsky5.common import UserError
from kandinsky5.configs import TINY_DIT, get_task
from kandinsky5.model import flow
from kandinsky5.model.dit import DiT
from kandinsky5.model.text_encoders import TextEmbeds
from kandinsky5.sampling.pipeline import (
    DEFAULT_NEGATIVE_PROMPT,
    SamplingSpec,
    _cfg_text,
    _velocity,
    dit_input,
    fit_image,
    i2v_size,
    initial_noise,
    normalize_first_frame,
    sample_latents,
)
from kandinsky5.sampling.prompts import parse_prompt_line
from kandinsky5.sampling.video_io import read_image, read_video, to_uint8_frames, write_image, write_video
from tests.helpers import randomize_, rel_close

TEXT_DIM, POOLED_DIM = TINY_DIT.in_text_dim, TINY_DIT.in_text_dim2


def _spec(**kw) -> SamplingSpec:
    base = dict(width=64, height=48, frames=9, steps=6, guidance=5.0, scheduler_scale=5.0, seed=3)
    return SamplingSpec(**{**base, **kw})


def _text(length: int, seed: int) -> TextEmbeds:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, length, TEXT_DIM, generator=g)
    return TextEmbeds(emb, torch.ones(1, length, dtype=torch.bool), torch.randn(1, POOLED_DIM, generator=g))


class MockDiT(nn.Module):
    """Elementwise velocity field with the DiT's signature: identical results batched or not.  Counts calls."""

    def __init__(self):
        super().__init__()
        self.config = TINY_DIT
        self.anchor = nn.Parameter(torch.zeros(()))
        self.batches: list[int] = []

    def forward(self, x, text_embed, text_mask, pooled, time, scale_factor=(1.0, 2.0, 2.0)):
        self.batches.append(x.shape[0])
        per_sample = lambda v: v.view(-1, 1, 1, 1, 1)  # noqa: E731
        a, c, s = per_sample(text_embed[:, 0, 0]), per_sample(pooled[:, 0]), per_sample(time / 1000)
        return torch.sin(x[..., :16] * (1 + a)) * s + 0.5 * x[..., 16:32] + x[..., 32:33] * c - 0.3 * x[..., :16]


# ----------------------------------------------------------------------------------------------------------------
# official reference, written line by line after kandinsky-5 generation_utils.py (fp32 state)
# ----------------------------------------------------------------------------------------------------------------


def official_normalize_first_frame(latents, reference_frames=5):
    samples = latents.clone()
    first = samples[:4]
    reference = samples[4 : 4 + min(reference_frames, samples.shape[0] - 1)]
    source_mean = first.mean(dim=(1, 2, 3), keepdim=True)
    source_std = first.std(dim=(1, 2, 3), keepdim=True)
    reference_mean = torch.clamp(reference.mean(), source_mean - 0.05, source_mean + 0.1)
    reference_std = torch.clamp(reference.std(), source_std - 0.1, source_std + 0.25)
    samples[:4] = (first - source_mean) / source_std * reference_std + reference_mean
    return samples


def official_generate(model, img, num_steps, cond, uncond, w, s, first_frames=None, last_frames=None):
    """``generate`` + the I2V post-processing of ``generate_sample_i2v``; img (T, H, W, 16); batch of 1."""
    img = img.clone()
    timesteps = torch.linspace(1, 0, num_steps + 1)
    timesteps = s * timesteps / (1 + (s - 1) * timesteps)
    for timestep, timestep_diff in zip(timesteps[:-1], torch.diff(timesteps)):
        time = timestep.unsqueeze(0)
        visual_cond = torch.zeros_like(img)
        visual_cond_mask = torch.zeros([*img.shape[:-1], 1], dtype=img.dtype)
        if first_frames is not None:
            img[:1] = first_frames
            visual_cond_mask[:1] = 1
        if last_frames is not None:  # our first+last extension
            img[-1:] = last_frames
            visual_cond_mask[-1:] = 1
        model_input = torch.cat([img, visual_cond, visual_cond_mask], dim=-1)[None]
        pred = model(model_input, cond.embeds, cond.mask, cond.pooled, time * 1000)[0]
        if abs(w - 1.0) > 1e-6:
            uncond_pred = model(model_input, uncond.embeds, uncond.mask, uncond.pooled, time * 1000)[0]
            pred = uncond_pred + w * (pred - uncond_pred)
        img[..., : pred.shape[-1]] += timestep_diff * pred
    if first_frames is not None:
        img[:1] = first_frames
        if last_frames is not None:
            img[-1:] = last_frames
        if img.shape[0] > 4:
            img = official_normalize_first_frame(img)
    return img


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_t2v_loop_equals_official_reimplementation_exactly(guidance):
    spec = _spec(guidance=guidance)
    cond, uncond = _text(5, 1), _text(11, 2)
    ours = sample_latents(MockDiT(), cond, uncond, spec, progress=False)
    ref = official_generate(MockDiT(), initial_noise(spec)[0], spec.steps, cond, uncond, guidance, 5.0)
    assert torch.equal(ours[0], ref)


@pytest.mark.parametrize("with_last", [False, True])
def test_i2v_loop_equals_official_reimplementation_exactly(with_last):
    spec = _spec(frames=21, steps=5)  # 6 latent frames: normalize_first_frame is active
    cond, uncond = _text(7, 1), _text(4, 2)
    g = torch.Generator().manual_seed(9)
    first = torch.randn(1, 1, 6, 8, 16, generator=g)
    last = torch.randn(1, 1, 6, 8, 16, generator=g) if with_last else None
    ours = sample_latents(MockDiT(), cond, uncond, spec, first, last, progress=False)
    noise, last_ref = initial_noise(spec)[0], None if last is None else last[0]
    ref = official_generate(MockDiT(), noise, spec.steps, cond, uncond, 5.0, 5.0, first[0], last_ref)
    assert torch.equal(ours[0], ref)
    if with_last:
        assert torch.equal(ours[0, -1], last[0, 0])


def test_cfg_is_one_batched_call_and_skipped_at_guidance_one():
    dit = MockDiT()
    sample_latents(dit, _text(3, 0), _text(6, 1), _spec(steps=3), progress=False, cfg_mode="batched")
    assert dit.batches == [2, 2, 2]
    dit = MockDiT()
    sample_latents(dit, _text(3, 0), _text(6, 1), _spec(steps=3), progress=False, cfg_mode="two_calls")
    assert dit.batches == [1, 1] * 3
    dit = MockDiT()
    sample_latents(dit, _text(3, 0), None, _spec(steps=3, guidance=1.0), progress=False)
    assert dit.batches == [1, 1, 1]


def test_batched_cfg_equals_two_separate_calls_on_the_real_dit():
    torch.manual_seed(0)
    dit = randomize_(DiT(TINY_DIT), seed=1).eval()
    spec = _spec(width=64, height=64, frames=5)
    cond, uncond = _text(5, 1), _text(12, 2)
    x = dit_input(torch.randn(1, 2, 8, 8, 16), first=True, last=False)
    t = torch.tensor(0.7)
    with torch.no_grad():
        batched = _velocity(dit, x, _cfg_text(cond, uncond, 5.0), t, spec, torch.float32)
        time = flow.dit_time(t).expand(1)
        v_c = dit(x, cond.embeds, cond.mask, cond.pooled, time, scale_factor=spec.rope_scale)
        v_u = dit(x, uncond.embeds, uncond.mask, uncond.pooled, time, scale_factor=spec.rope_scale)
    separate = flow.cfg_combine(v_c, v_u, 5.0)
    # Not bit-equal: q/k are rounded to bf16 after RoPE (as official), so batch-size-dependent fp32 rounding flips a
    # few bf16 ulps.  Bound = the project's whole-model fp32 tolerance (architecture.md 9): 1e-4 * max|ref|.
    ok, rel = rel_close(batched, separate, 1e-4)
    assert ok, rel


def test_dit_input_layout():
    x = torch.randn(2, 4, 2, 2, 16)
    out = dit_input(x, first=True, last=True)
    assert out.shape == (2, 4, 2, 2, 33)
    assert torch.equal(out[..., :16], x) and not out[..., 16:32].any()
    assert out[:, 0, ..., 32].eq(1).all() and out[:, -1, ..., 32].eq(1).all() and not out[:, 1:-1, ..., 32].any()
    assert not dit_input(x, first=False, last=False)[..., 32].any()


def test_normalize_first_frame_matches_official_per_frame_version():
    g = torch.Generator().manual_seed(0)
    for frames in (5, 7, 12):
        x = torch.randn(frames, 4, 6, 16, generator=g) * torch.linspace(0.5, 2.0, frames).view(-1, 1, 1, 1)
        ours = normalize_first_frame(x[None])[0]
        torch.testing.assert_close(ours, official_normalize_first_frame(x), rtol=1e-6, atol=1e-6)
    short = torch.randn(1, 3, 2, 2, 16, generator=g)
    assert torch.equal(normalize_first_frame(short), short)  # official gives NaN there; we skip


def test_noise_is_seeded_per_sample_on_cpu():
    spec = _spec()
    a, b = initial_noise(spec, 2), initial_noise(spec, 2)
    assert torch.equal(a, b) and a.shape == (2, 3, 6, 8, 16) and a.dtype == torch.float32
    assert torch.equal(a[1], initial_noise(_spec(seed=4))[0])
    assert torch.equal(a[0], torch.randn(3, 6, 8, 16, generator=torch.Generator().manual_seed(3)))


def test_spec_validation_and_task_defaults():
    with pytest.raises(UserError, match="4k\\+1.*nearest valid: 13, 17"):
        _spec(frames=16)
    with pytest.raises(UserError, match="multiple of 16"):
        _spec(width=100)
    spec = SamplingSpec.from_task(get_task("k5-pro-t2v-5s-hd"), seed=1, steps=4, width=None)
    assert (spec.width, spec.height, spec.frames, spec.steps, spec.rope_scale) == (1024, 1024, 121, 4, (1, 3.16, 3.16))
    assert spec.latent_shape == (31, 128, 128, 16)
    assert DEFAULT_NEGATIVE_PROMPT.startswith("Static, 2D cartoon")


def test_i2v_size_follows_official_rule():
    assert i2v_size(768, 512, 512 * 768, 16) == (768, 512)
    assert i2v_size(1920, 1080, 512 * 768, 16) == (832, 464)  # 16:9 at ~393k pixels
    assert i2v_size(300, 300, 1024 * 1024, 128) == (1024, 1024)
    w, h = i2v_size(160, 120, 128 * 128, 16)
    assert (w % 16, h % 16) == (0, 0) and abs(w * h - 128 * 128) < 0.2 * 128 * 128


def test_fit_image_plain_and_center_crop():
    from PIL import Image

    img = Image.fromarray(np.zeros((100, 300, 3), np.uint8))
    assert fit_image(img, 64, 32, crop=False).size == (64, 32)
    cropped = fit_image(img, 64, 64, crop=True)
    assert cropped.size == (64, 64)


# ----------------------------------------------------------------------------------------------------------------
# prompt lines
# ----------------------------------------------------------------------------------------------------------------


def test_prompt_line_overrides():
    line = parse_prompt_line(
        "A cat walks. --w 256 --h 128 --f 17 --d 7 --s 20 --g 4.5 --n blurry, dark --i a.png --l b.png"
    )
    assert line.prompt == "A cat walks."
    assert line.overrides() == dict(
        width=256, height=128, frames=17, seed=7, steps=20, guidance=4.5, negative_prompt="blurry, dark",
        image="a.png", image_last="b.png",
    )  # fmt: skip
    assert parse_prompt_line("   ") is None and parse_prompt_line("# comment") is None
    assert parse_prompt_line("plain prompt").overrides() == {}
    assert parse_prompt_line("x --fs 3").overrides() == {}  # musubi key without meaning here: ignored


def test_prompt_line_errors_name_the_place():
    with pytest.raises(UserError, match="p.txt:3: unknown option --zz"):
        parse_prompt_line("cat --zz 1", where="p.txt:3")
    with pytest.raises(UserError, match="--w expects int"):
        parse_prompt_line("cat --w wide")


# ----------------------------------------------------------------------------------------------------------------
# media files
# ----------------------------------------------------------------------------------------------------------------


def test_mp4_and_png_round_trip_with_metadata(tmp_path):
    video = torch.linspace(-1, 1, 9).view(1, 1, 9, 1, 1).expand(1, 3, 9, 32, 48)
    frames = to_uint8_frames(video)[0]
    assert frames.shape == (9, 32, 48, 3) and frames[0, 0, 0, 0] == 0 and frames[-1, 0, 0, 0] == 255
    meta = {"prompt": "a cat", "seed": "3"}
    write_video(tmp_path / "v.mp4", frames, 24, meta)
    back, fps, read_meta = read_video(tmp_path / "v.mp4")
    assert back.shape == frames.shape and fps == 24 and read_meta == meta
    assert np.abs(back.astype(int) - frames.astype(int)).max() <= 3
    write_image(tmp_path / "i.png", frames[4], meta)
    image, image_meta = read_image(tmp_path / "i.png")
    assert np.array_equal(image, frames[4]) and image_meta == meta
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        write_video(tmp_path / "v.mp4", frames, 24, meta)
    write_video(tmp_path / "v.mp4", frames, 12, meta, overwrite=True)
    assert read_video(tmp_path / "v.mp4")[1] == 12


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"guidance": float("nan")}, "--guidance must be a finite number"),
        ({"scheduler_scale": float("inf")}, "--scheduler_scale must be positive"),
    ],
)
def test_non_finite_guidance_or_scale_is_refused(kw, message):
    """A NaN guidance would sample a NaN video and write it without complaint."""
    with pytest.raises(UserError, match=message):
        _spec(**kw)
