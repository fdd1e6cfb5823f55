"""Strict, streamed DiT checkpoint loading and its one-line errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from kandinsky5.common import UserError
from kandinsky5.configs import get_task
from kandinsky5.model.dit import DiT
from kandinsky5.model.loading import load_dit, param_dtype
from tests.helpers import randomize_

TASK = get_task("k5-tiny-t2v")


@pytest.fixture()
def ckpt(tmp_path):
    dit = randomize_(DiT(TASK.dit), seed=2)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in dit.state_dict().items()}, str(path))
    return path, dit


def test_load_roundtrip_bf16_and_dtype_policy(ckpt):
    path, ref = ckpt
    dit = load_dit(TASK, path, dtype=torch.bfloat16)
    sd = dit.state_dict()
    for key, value in ref.state_dict().items():
        assert sd[key].dtype == param_dtype(key, torch.bfloat16, stored=torch.bfloat16)
        torch.testing.assert_close(sd[key].float(), value.to(torch.bfloat16).float(), rtol=0, atol=0)
    # conditioning weights keep the checkpoint's precision: no fp32 copy of a bf16 file
    assert sd["visual_transformer_blocks.0.visual_modulation.out_layer.weight"].dtype == torch.bfloat16
    assert sd["time_embeddings.in_layer.weight"].dtype == torch.bfloat16
    assert sd["visual_transformer_blocks.0.feed_forward.in_layer.weight"].dtype == torch.bfloat16
    assert not any(p.is_meta for p in dit.parameters())


def test_fp32_checkpoint_keeps_fp32_conditioning_in_a_bf16_run(tmp_path):
    dit = randomize_(DiT(TASK.dit), seed=4)
    path = tmp_path / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(path))
    sd = load_dit(TASK, path, dtype=torch.bfloat16).state_dict()
    assert sd["visual_transformer_blocks.0.visual_modulation.out_layer.weight"].dtype == torch.float32
    assert sd["time_embeddings.out_layer.bias"].dtype == torch.float32
    assert sd["visual_transformer_blocks.0.feed_forward.in_layer.weight"].dtype == torch.bfloat16


def test_bf16_stored_conditioning_is_computed_in_fp32():
    """A bf16-stored modulation gives exactly the fp32 computation on its (bf16-representable) weights."""
    dit = randomize_(DiT(TASK.dit), seed=5)
    layer = dit.visual_transformer_blocks[0].visual_modulation
    with torch.no_grad():
        layer.out_layer.weight.copy_(layer.out_layer.weight.to(torch.bfloat16).float())
        layer.out_layer.bias.copy_(layer.out_layer.bias.to(torch.bfloat16).float())
    t = torch.randn(2, TASK.dit.time_dim)
    expected = layer(t)
    layer.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(t)
    assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_comfy_prefix_is_stripped(tmp_path, ckpt):
    path, ref = ckpt
    prefixed = tmp_path / "comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in ref.state_dict().items()}, str(prefixed))
    load_dit(TASK, prefixed, dtype=torch.float32)


def test_wrong_task_is_one_line_error(ckpt):
    path, _ = ckpt
    other = dataclasses.replace(TASK, name="k5-other", dit=dataclasses.replace(TASK.dit, num_visual_blocks=5))
    with pytest.raises(UserError) as err:
        load_dit(other, path)
    msg = str(err.value)
    assert "\n" not in msg and "k5-other" in msg and "missing key 'visual_transformer_blocks.4" in msg
    wide = dataclasses.replace(TASK, dit=dataclasses.replace(TASK.dit, ff_dim=256))
    with pytest.raises(UserError, match="mis-shaped key 'text_transformer_blocks.0.feed_forward.in_layer.weight'"):
        load_dit(wide, path)


def test_unexpected_key_and_missing_file(tmp_path, ckpt):
    path, ref = ckpt
    extra = tmp_path / "extra.safetensors"
    save_file({**{k: v.contiguous() for k, v in ref.state_dict().items()}, "lora.x": torch.zeros(1)}, str(extra))
    with pytest.raises(UserError, match="unexpected key 'lora.x'"):
        load_dit(TASK, extra)
    with pytest.raises(UserError, match="not found"):
        load_dit(TASK, tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(UserError, match="corrupt header"):
        load_dit(TASK, bad)


def test_a_directory_of_shards_loads_and_one_of_whole_checkpoints_is_refused(tmp_path, ckpt):
    """Shards split the keys; two whole checkpoints side by side (a t2v and an i2v file, say) are not one model."""
    _, ref = ckpt
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in ref.state_dict().items()}
    keys = sorted(state)
    shards = tmp_path / "shards"
    shards.mkdir()
    save_file({k: state[k] for k in keys[::2]}, str(shards / "part-1.safetensors"))
    save_file({k: state[k] for k in keys[1::2]}, str(shards / "part-2.safetensors"))
    dit = load_dit(TASK, shards, dtype=torch.bfloat16)
    assert all(torch.equal(dit.state_dict()[k], state[k]) for k in keys)
    whole = tmp_path / "whole"
    whole.mkdir()
    for name in ("a_t2v.safetensors", "b_i2v.safetensors"):
        save_file(state, str(whole / name))
    with pytest.raises(UserError, match="a_t2v.safetensors and b_i2v.safetensors both hold .*not shards of one"):
        load_dit(TASK, whole)
