"""The tiny offline bundle: layout, determinism, real on-disk formats, and that every component loads and runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kandinsky5.configs import get_task
from kandinsky5.model.text_encoders import TextEncoder
from kandinsky5.model.vae import VideoVAE
from kandinsky5.tiny_weights import DIT_TASKS, QWEN_SPECIALS, main, write_bundle

EXPECTED_FILES = {
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/tokenizer.json",
    "text_encoder/tokenizer_config.json",
    "text_encoder2/config.json",
    "text_encoder2/model.safetensors",
    "text_encoder2/tokenizer.json",
    "text_encoder2/tokenizer_config.json",
    "model/k5_tiny_t2v.safetensors",
    "model/k5_tiny_i2v.safetensors",
}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_layout_has_no_leftovers(tiny_bundle):
    files = set(_hashes(tiny_bundle))
    assert EXPECTED_FILES <= files
    assert not [f for f in files if Path(f).name.startswith(".")]  # no staging or temp files left behind


def test_same_seed_same_bytes_via_cli(tiny_bundle, tmp_path, capsys):
    assert main(["--output_dir", str(tmp_path / "again")]) == 0
    assert _hashes(tmp_path / "again") == _hashes(tiny_bundle)
    printed = capsys.readouterr().out
    assert "k5_tiny_t2v.safetensors" in printed and "text_encoder2/" in printed


def test_other_seed_other_weights(tiny_bundle, tmp_path):
    other = _hashes(write_bundle(tmp_path / "seed1", seed=1))
    base = _hashes(tiny_bundle)
    assert other["model/k5_tiny_t2v.safetensors"] != base["model/k5_tiny_t2v.safetensors"]
    assert other["vae/diffusion_pytorch_model.safetensors"] != base["vae/diffusion_pytorch_model.safetensors"]
    assert other["text_encoder/tokenizer.json"] == base["text_encoder/tokenizer.json"]  # tokenizers do not use it


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--output_dir" in text and "--seed" in text and "default: 0" in text


# -- DiT checkpoints -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", DIT_TASKS)
def test_dit_checkpoint_official_layout(tiny_bundle, task):
    from kandinsky5.model.dit import DiT

    path = tiny_bundle / "model" / get_task(task).checkpoint
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "k5_task": task}
    state = load_file(path)
    model = DiT(get_task(task).dit)
    reference = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    modulation = [v for k, v in state.items() if "modulation" in k]
    assert modulation and all(v.float().abs().mean() > 1e-3 for v in modulation)  # not the zero init
    norms = [v.float() for k, v in state.items() if k.endswith("norm.weight")]
    assert norms and all(0.7 < v.mean() < 1.3 for v in norms)
    model.load_state_dict(state, strict=True)


def test_t2v_and_i2v_differ_and_run(tiny_bundle):
    from kandinsky5.model.dit import DiT

    cfg = get_task("k5-tiny-t2v").dit
    a = load_file(tiny_bundle / "model" / "k5_tiny_t2v.safetensors")
    b = load_file(tiny_bundle / "model" / "k5_tiny_i2v.safetensors")
    assert not torch.equal(a["out_layer.out_layer.weight"], b["out_layer.out_layer.weight"])
    model = DiT(cfg)
    model.load_state_dict(a, strict=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 4, 4, cfg.in_channels, generator=gen)
    text = torch.randn(1, 5, cfg.in_text_dim, generator=gen)
    pooled = torch.randn(1, cfg.in_text_dim2, generator=gen)
    with torch.no_grad():
        out = model(x, text, None, pooled, torch.tensor([500.0]))
    assert out.shape == (1, 2, 4, 4, 16) and torch.isfinite(out).all() and out.std() > 1e-3


# -- text encoders and VAE -------------------------------------------------------------------------------------


def test_qwen_tokenizer_and_config(tiny_bundle):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bundle / "text_encoder")
    assert tok.padding_side == "right" and tok.pad_token == "<|endoftext|>"
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN_SPECIALS}
    for special, idx in ids.items():
        assert tok(special)["input_ids"] == [idx]  # one token each
    config = AutoConfig.from_pretrained(tiny_bundle / "text_encoder")
    assert config.text_config.hidden_size == 64 and config.text_config.vocab_size >= len(tok)
    assert config.image_token_id == ids["<|image_pad|>"] and config.video_token_id == ids["<|video_pad|>"]
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    assert config.vision_end_token_id == ids["<|vision_end|>"]
    text = config.text_config
    assert text.hidden_size // text.num_attention_heads == 2 * sum(text.rope_parameters["mrope_section"])
    assert len(tok("a red square moves across the screen")["input_ids"]) < 20  # merges were learned


def test_clip_tokenizer_and_config(tiny_bundle):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bundle / "text_encoder2")
    assert tok.eos_token_id == len(tok) - 1 and tok.pad_token_id == tok.eos_token_id
    ids = tok("a red square")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    config = json.loads((tiny_bundle / "text_encoder2" / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["eos_token_id"] == tok.eos_token_id


def test_components_load_through_the_adapters(tiny_bundle):
    encoder = TextEncoder.load(tiny_bundle / "text_encoder", tiny_bundle / "text_encoder2")
    out = encoder.encode(["a red square"])
    cfg = get_task("k5-tiny-t2v").dit
    assert out.embeds.dtype == torch.bfloat16 and out.embeds.shape[-1] == cfg.in_text_dim
    assert out.pooled.shape == (1, cfg.in_text_dim2)
    vae = VideoVAE.load(tiny_bundle / "vae")
    assert vae.dtype == torch.float16 and vae.encode(torch.zeros(1, 3, 5, 16, 16)).shape == (1, 2, 2, 2, 16)
