"""Task registry: every official video task with the settings of architecture.md section 0 / the official yamls."""

from __future__ import annotations

import dataclasses

import pytest

from kandinsky5.configs import LITE_DIT, PRO_DIT, TASKS, get_task, latent_frames

SD, HD = (1.0, 2.0, 2.0), (1.0, 3.16, 3.16)
# task: (family, mode, NABLA P or None, rope scale, frames, steps, guidance, scheduler_scale, width)
EXPECTED = {
    "k5-pro-t2v-5s-sd": ("pro", "t2v", None, SD, 121, 50, 5.0, 10.0, 512),
    "k5-pro-t2v-5s-hd": ("pro", "t2v", 0.8, HD, 121, 50, 5.0, 10.0, 1024),
    "k5-pro-t2v-10s-sd": ("pro", "t2v", 0.9, SD, 241, 50, 5.0, 10.0, 512),
    "k5-pro-t2v-10s-hd": ("pro", "t2v", 0.7, HD, 241, 50, 5.0, 10.0, 1024),
    "k5-pro-i2v-5s-sd": ("pro", "i2v", None, SD, 121, 50, 5.0, 10.0, 512),
    "k5-pro-i2v-5s-hd": ("pro", "i2v", 0.8, HD, 121, 50, 5.0, 5.0, 1024),
    "k5-lite-t2v-5s-sd": ("lite", "t2v", None, SD, 121, 50, 5.0, 10.0, 512),
    "k5-lite-t2v-10s-sd": ("lite", "t2v", 0.9, SD, 241, 50, 5.0, 10.0, 512),
    "k5-lite-t2v-5s-pretrain-sd": ("lite", "t2v", None, SD, 121, 50, 5.0, 10.0, 512),
    "k5-lite-t2v-10s-pretrain-sd": ("lite", "t2v", 0.9, SD, 241, 50, 5.0, 10.0, 512),
    "k5-lite-t2v-5s-nocfg-sd": ("lite", "t2v", None, SD, 121, 50, 1.0, 10.0, 512),
    "k5-lite-t2v-10s-nocfg-sd": ("lite", "t2v", 0.9, SD, 241, 50, 1.0, 10.0, 512),
    "k5-lite-t2v-5s-distil-sd": ("lite", "t2v", None, SD, 121, 16, 1.0, 5.0, 512),
    "k5-lite-t2v-10s-distil-sd": ("lite", "t2v", 0.9, SD, 241, 16, 1.0, 10.0, 512),
    "k5-lite-i2v-5s-sd": ("lite", "i2v", None, SD, 121, 50, 5.0, 10.0, 512),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_official_task_settings(name):
    family, mode, p, rope, frames, steps, guidance, scale, width = EXPECTED[name]
    task = get_task(name)
    assert (task.family, task.mode, task.rope_scale, task.frames) == (family, mode, rope, frames)
    assert (task.steps, task.guidance, task.scheduler_scale, task.width) == (steps, guidance, scale, width)
    assert task.dit == (PRO_DIT if family == "pro" else LITE_DIT)
    assert task.dit.in_channels == 33 and task.text_template == "video" and task.text_max_length == 256
    if p is None:
        assert task.nabla is None
    else:
        n = task.nabla
        assert (n.P, n.method, n.wT, n.wH, n.wW, n.add_sta) == (p, "topcdf", 11, 3, 3, True)
    assert task.checkpoint.endswith(".safetensors") and task.hf_repo.startswith("kandinskylab/")


def test_registry_has_exactly_the_official_video_tasks_and_two_tiny_ones():
    assert set(TASKS) == set(EXPECTED) | {"k5-tiny-t2v", "k5-tiny-i2v"}
    assert get_task("k5-lite-t2v-10s-nocfg-sd").checkpoint == "kandinsky5lite_t2v_nocfg_10s.safetensors"


def test_architectures_and_tiny_models():
    assert (PRO_DIT.head_dim, PRO_DIT.num_heads, LITE_DIT.head_dim, LITE_DIT.num_heads) == (128, 32, 64, 28)
    tiny = get_task("k5-tiny-t2v")
    assert tiny.dit.in_channels == 33 and tiny.dit.axes_dims == LITE_DIT.axes_dims
    assert tiny.width % 128 == 0 and tiny.height % 128 == 0  # NABLA geometry works on the demo size
    assert get_task("k5-tiny-i2v").is_i2v and not tiny.is_i2v
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.steps = 3


@pytest.mark.parametrize("frames,latent", [(1, 1), (5, 2), (17, 5), (121, 31), (241, 61)])
def test_latent_frames(frames, latent):
    assert latent_frames(frames) == latent


def test_latent_frames_rejects_other_counts_with_the_nearest_valid_ones():
    with pytest.raises(ValueError, match="got 10, nearest valid: 9, 13"):
        latent_frames(10)
