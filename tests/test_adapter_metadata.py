"""What our adapter files carry (issue 13.B): kohya's sshs hashes, lora_adapter_metadata that diffusers reads,
the cached full checkpoint sha256, and the trainer's metadata flags (trigger word, modelspec, ss_datasets,
--save_precision, --no_metadata, --base_weights, --dim_from_weights)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from kandinsky5.configs import get_task
from kandinsky5.model.dit import DiT
from networks.lora import LoRANetwork
from networks.lora_kandinsky import DEFAULT_INCLUDE_PATTERNS, create_network, read_adapter, save_lora
from tests.helpers import randomize_

TINY = get_task("k5-tiny-t2v").dit


def _header(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def test_sshs_hashes_are_kohyas(tmp_path):
    net = create_network(1.0, 64, 32, DiT(TINY))  # 3 MB: the legacy hash reads the 64 KiB at 1 MiB
    randomize_(net, 1)
    meta = save_lora(tmp_path / "a.safetensors", net, {"ss_seed": "3", "k5_task": "x"}, format="comfyui")
    data = (tmp_path / "a.safetensors").read_bytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()
    ss_only = save(load_file(tmp_path / "a.safetensors"), {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert _header(tmp_path / "a.safetensors")["sshs_legacy_hash"] == meta["sshs_legacy_hash"]


def test_diffusers_reads_our_lora_adapter_metadata_with_mixed_ranks(tmp_path):
    pytest.importorskip("peft")
    from diffusers.loaders.lora_pipeline import KandinskyLoraLoaderMixin

    from tests.helpers import diffusers_dit, diffusers_forward

    torch.manual_seed(0)
    dit = randomize_(DiT(TINY).eval(), 0)
    names = [n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear) and "to_" in n]
    net = LoRANetwork(dit, module_ranks={n: (2 + 2 * (i % 2), 3.0) for i, n in enumerate(names)})
    randomize_(net, 2, std=0.1)
    for fmt in ("diffusers", "comfyui"):
        config = json.loads(save_lora(tmp_path / f"{fmt}.safetensors", net, format=fmt)["lora_adapter_metadata"])
        assert config["transformer.r"] in (2, 4) and config["transformer.rank_pattern"]
        assert config["transformer.lora_alpha"] == (3.0 if fmt == "comfyui" else config["transformer.r"])
    sd, metadata = KandinskyLoraLoaderMixin.lora_state_dict(tmp_path / "diffusers.safetensors",
                                                             return_lora_metadata=True)  # fmt: skip
    model = diffusers_dit(TINY)
    model.load_state_dict(dit.state_dict(), strict=False)
    model.load_lora_adapter(sd, metadata=metadata, prefix="transformer")
    g = torch.Generator().manual_seed(1)
    x, text, pooled = torch.randn(1, 2, 8, 8, 33, generator=g), torch.randn(1, 7, 64, generator=g), torch.randn(1, 32)
    net.apply_to(dit)
    with torch.no_grad():
        ours = dit(x, text, None, pooled, torch.tensor([500.0]))
        theirs = diffusers_forward(model, x, text, pooled, torch.tensor([500.0]))
    assert float((ours - theirs).abs().max() / ours.abs().max()) <= 1e-4


def test_checkpoint_sha256_is_cached_per_file(tmp_path, monkeypatch):
    from kandinsky5.model import checkpoint_hash

    monkeypatch.setenv("K5_HASH_CACHE", str(tmp_path / "cache" / "sha.json"))
    path = tmp_path / "dit.safetensors"
    save_file({"w": torch.arange(1000.0)}, str(path))
    digest = checkpoint_hash.checkpoint_sha256(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setattr(checkpoint_hash, "_file_sha256", lambda p: pytest.fail("re-hashed a cached file"))
    assert checkpoint_hash.checkpoint_sha256(path) == digest
    save_file({"w": torch.arange(999.0)}, str(path))  # new size and mtime: the cache entry no longer applies
    monkeypatch.undo()
    monkeypatch.setenv("K5_HASH_CACHE", str(tmp_path / "cache" / "sha.json"))
    assert checkpoint_hash.checkpoint_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from tests.test_training import write_toy_cache

    return write_toy_cache(tmp_path_factory.mktemp("toy"), n_items=2)


def test_trainer_metadata_flags_and_adapter_files(tiny_bundle, toy, tmp_path, monkeypatch):
    from networks import loha_kandinsky
    from tests.test_train_cli import base_args, train

    monkeypatch.setenv("K5_HASH_CACHE", str(tmp_path / "sha.json"))
    dit_file = tiny_bundle / "model" / "k5_tiny_t2v.safetensors"
    loha = loha_kandinsky.create_network(1.0, 2, 2.0, DiT(TINY), {"include_patterns": [r".*\.to_value"]})
    save_lora(tmp_path / "start.safetensors", loha)
    base = create_network(1.0, 2, 2.0, DiT(TINY))
    randomize_(base, 4, std=0.01)
    save_lora(tmp_path / "base.safetensors", base, format="musubi")
    out = tmp_path / "out"
    extra = ["--network_weights", str(tmp_path / "start.safetensors"), "--dim_from_weights",
             "--base_weights", str(tmp_path / "base.safetensors"), "--base_weights_multiplier", "0.5",
             "--trigger_word", "k5tok", "--training_comment", "hello", "--metadata_title", "My LoHa",
             "--metadata_author", "me", "--metadata_reso", "640,480", "--save_precision", "bf16"]  # fmt: skip
    assert train(base_args(tiny_bundle, toy, out) + extra) == 0
    meta, tensors = _header(out / "lora.safetensors"), load_file(out / "lora.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in tensors} == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    assert all(t.dtype == (torch.float32 if k.endswith("alpha") else torch.bfloat16) for k, t in tensors.items())
    assert meta["ss_network_module"] == "networks.loha_kandinsky" and meta["trigger"] == "k5tok"
    assert meta["modelspec.title"] == "My LoHa" and meta["modelspec.author"] == "me"
    assert meta["modelspec.resolution"] == "640x480" and meta["modelspec.architecture"] == "Kandinsky-5/lycoris"
    assert meta["ss_training_comment"] == "hello" and json.loads(meta["k5_base_weights"]) == {"base.safetensors": 0.5}
    assert meta["k5_base_checkpoint_sha256"] == hashlib.sha256(dit_file.read_bytes()).hexdigest()
    datasets = json.loads(meta["ss_datasets"])
    assert datasets[0]["num_items"] == 2 and "/" not in json.dumps(datasets).replace("\\/", "")
    assert read_adapter(out / "lora.safetensors").trigger == "k5tok"

    assert train(base_args(tiny_bundle, toy, tmp_path / "min") + ["--no_metadata", "--trigger_word", "k5tok"]) == 0
    minimal = _header(tmp_path / "min" / "lora.safetensors")
    assert "ss_datasets" not in minimal and "k5_task" not in minimal and "ss_seed" not in minimal
    assert minimal["trigger"] == "k5tok" and minimal["ss_network_module"] == "networks.lora_kandinsky"
    assert minimal["modelspec.architecture"] == "Kandinsky-5/lora" and minimal["sshs_model_hash"]
    assert len(DEFAULT_INCLUDE_PATTERNS) == 2


def test_adapter_flag_errors(tiny_bundle, toy, tmp_path, capsys):
    from tests.test_train_cli import base_args, train

    cases = [
        (["--dim_from_weights"], "--dim_from_weights builds the network from --network_weights"),
        (["--base_weights", str(tmp_path / "missing.safetensors")], "does not exist"),
        (["--base_weights_multiplier", "1", "2"], "2 --base_weights_multiplier values for 0"),
        (["--metadata_reso", "big"], "--metadata_reso 'big'"),
        (["--network_module", "networks.loha_kandinsky", "--save_format", "diffusers"], "holds LoRA only"),
    ]
    for extra, message in cases:
        assert train(base_args(tiny_bundle, toy, tmp_path / "o") + extra) == 1
        assert message in capsys.readouterr().err
