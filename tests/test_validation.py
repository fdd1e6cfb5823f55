"""Validation loss: the split (stable, disjoint, clips together), the number (deterministic across runs and resumes,
I2V masking as training) and its isolation (a LoRA trained with validation on is bit-identical to one without)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dataset.latent_dataset import CachedItem, collate
from dataset.split import key_fraction, split_validation
from kandinsky5.common import UserError
from kandinsky5.train.config import ValidationConfig
from kandinsky5.train.distributed import DistContext
from kandinsky5.train.insight.validation import Validator, noise_seed, parse_timesteps
from kandinsky5.train.objective import batch_to_device, flow_matching_loss
from tests.test_training import TINY_I2V, random_batch, tiny_dit, write_toy_cache


def _item(key: str, dataset: int = 0, clip: int = 0) -> CachedItem:
    return CachedItem(Path(f"{key}_{clip}.safetensors"), Path(f"{key}_te.safetensors"), (1, 2, 2), dataset, 1, 1, key)


def test_split_is_stable_disjoint_and_keeps_clips_together():
    items = [_item(f"video_{i}.mp4", clip=c) for i in range(200) for c in range(2)] + [_item("val.png", dataset=1)]
    train, val = split_validation(items, {1}, 0.2)
    assert {id(i) for i in train}.isdisjoint(id(i) for i in val) and len(train) + len(val) == len(items)
    assert _item("val.png", dataset=1) in val  # is_validation dataset: always held out
    held = {i.item_key for i in val}
    assert all((i.item_key in held) == (i in val) for i in items)  # both clips of a video on the same side
    assert 0.12 < (len(held) - 1) / 200 < 0.28  # about the fraction asked for
    more = [_item(f"new_{i}.mp4") for i in range(50)]
    train2, val2 = split_validation(list(reversed(items)) + more, {1}, 0.2)  # other order, more items
    assert {i.item_key for i in val2} - {i.item_key for i in more} == held  # nobody changed side
    assert all(key_fraction(i.item_key) < 0.2 for i in val if i.dataset_index == 0)


def test_split_of_a_small_dataset_holds_out_one_item_and_errors_name_the_fix():
    items = [_item(f"clip_{i}.mp4") for i in range(3)]
    train, val = split_validation(items, set(), 0.01)  # nothing below 0.01: the smallest hash is held out
    assert len(val) == 1 and val[0].item_key == min((i.item_key for i in items), key=key_fraction)
    assert split_validation(items, set(), 0.0) == (items, [])
    with pytest.raises(UserError, match="no training items left"):
        split_validation(items, {0}, 0.0)
    with pytest.raises(UserError, match=r"--validation_split must be in \[0, 1\)"):
        ValidationConfig(split=1.0)
    with pytest.raises(UserError, match=r"\(0, 1\]"):
        ValidationConfig(timesteps=parse_timesteps("0,0.5"))
    with pytest.raises(UserError, match="--validation_timesteps 'a,b'"):
        parse_timesteps("a,b")


def test_i2v_validation_is_the_training_loss_at_fixed_t_and_noise():
    """The validator's number is flow_matching_loss with the I2V conditioning and loss mask of training, at each
    fixed t, with the noise of the item's own seed; the global RNG is untouched."""
    dit = tiny_dit(task=TINY_I2V)
    network = torch.nn.Linear(1, 1)  # stands in for the LoRA (train/eval toggled, restored)
    b = random_batch(b=1, lengths=(5,), image=True)
    sample = {"latents": b.latents[0], "text_embeds": b.text_embeds[0, :5], "pooled": b.pooled[0],
              "latents_image": b.latents_image[0]}  # fmt: skip
    cfg = SimpleNamespace(weight_dtype=torch.float32, autocast=False, i2v_mode="first_last", task=TINY_I2V)
    run = SimpleNamespace(
        cfg=cfg, ctx=DistContext(), dit=dit, network=network, generator=torch.Generator(), engine=None
    )
    vcfg = ValidationConfig(timesteps=(0.25, 0.75), seed=5)
    before = torch.get_rng_state()
    result = Validator(["clip|a"], lambda i: collate([sample]), vcfg)(run, step=3)
    assert torch.equal(torch.get_rng_state(), before) and network.training
    batch = batch_to_device(collate([sample]), torch.device("cpu"))
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(noise_seed(5, "clip|a")))
    with torch.no_grad():
        expected = [float(flow_matching_loss(dit, batch, torch.tensor([t]), noise, TINY_I2V.rope_scale, "first_last"))
                    for t in (0.25, 0.75)]  # fmt: skip
    assert [v for _, v in result.per_t] == expected and result.mean == pytest.approx(sum(expected) / 2, rel=1e-12)
    assert result.scalars().keys() == {"loss/validation", "loss/validation/t0.25", "loss/validation/t0.75"}


# ----------------------------------------------------------------------------------------------------------------
# through the trainer
# ----------------------------------------------------------------------------------------------------------------


def _with_validation_block(root: Path) -> tuple[Path, Path]:
    """(TOML with a training dataset + an is_validation dataset, TOML with the training dataset only)."""
    train_toml = write_toy_cache(root / "train", n_items=4, batch_size=1)
    val_toml = write_toy_cache(root / "val", n_items=1, seed=9)
    block = val_toml.read_text().split("[[datasets]]")[1]
    both = root / "both.toml"
    both.write_text(train_toml.read_text() + "\n[[datasets]]" + block + "is_validation = true\n")
    return both, train_toml


def _history(out: Path) -> dict:
    (folder,) = (out / "logs").iterdir()
    return json.loads((folder / "history.json").read_text())


def _equal_loras(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_validation_is_deterministic_resumable_and_leaves_training_unchanged(tiny_bundle, tmp_path):
    from tests.test_train_cli import base_args, train

    both, train_only = _with_validation_block(tmp_path)
    extra = ["--network_dropout", "0.2", "--network_args", "rank_dropout=0.1", "--lr_scheduler",
             "constant_with_warmup", "--lr_warmup_steps", "1", "--save_every_n_steps", "2", "--save_state",
             "--log_with", "none"]  # fmt: skip
    val = ["--validate_every_n_steps", "2", "--validation_timesteps", "0.2,0.8"]
    a, b, c, d = (tmp_path / n for n in "abcd")
    assert train(base_args(tiny_bundle, both, a, steps=4) + extra + val) == 0
    assert train(base_args(tiny_bundle, train_only, b, steps=4) + extra) == 0
    assert _equal_loras(a / "lora.safetensors", b / "lora.safetensors")  # validation changed nothing
    history = _history(a)["validation"]
    assert [v["step"] for v in history] == [0, 2, 4] and history[0]["items"] == 1
    assert [t for t, _ in history[0]["per_t"]] == [0.2, 0.8]
    assert history[0]["mean"] != history[-1]["mean"]  # the LoRA did change the number
    assert train(base_args(tiny_bundle, both, c, steps=2) + extra + val) == 0  # a fresh run, computed anew
    assert _history(c)["validation"] == history[:2]
    resume = ["--resume", str(a / "lora-step00000002-state")]
    assert train(base_args(tiny_bundle, both, d, steps=4) + extra + val + resume) == 0
    assert _history(d)["validation"] == history  # steps 0, 2 from the state, step 4 recomputed: identical
    assert _equal_loras(a / "lora.safetensors", d / "lora.safetensors")
    assert len(_history(d)["loss"]) == 4  # the resumed history continues the curve


def test_validation_needs_items_and_counts_only_training_items(tiny_bundle, tmp_path, capsys):
    from safetensors.torch import safe_open

    from tests.test_train_cli import base_args, train

    toml = write_toy_cache(tmp_path / "data", n_items=4)
    out = tmp_path / "out"
    assert train(base_args(tiny_bundle, toml, out, steps=1) + ["--validate_every_n_epochs", "1"]) == 1
    assert "need validation items" in capsys.readouterr().err and not out.exists()
    args = ["--validation_split", "0.5", "--validation_timesteps", "0.5", "--log_with", "none"]
    assert train(base_args(tiny_bundle, toml, out, steps=1, task="k5-tiny-i2v") + args) == 0
    held = _history(out)["validation"][0]["items"]
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert int(f.metadata()["ss_num_train_items"]) == 4 - held >= 1


def test_is_validation_is_a_dataset_key_only():
    from dataset.config import parse_dataset_config

    table = {"video_directory": "v", "cache_directory": "c", "caption_extension": ".txt"}
    cfg = parse_dataset_config({"datasets": [table, {**table, "cache_directory": "d", "is_validation": True}]})
    assert [d.is_validation for d in cfg.datasets] == [False, True]
    with pytest.raises(UserError, match=r"datasets\[0\].is_validation: invalid value 'yes'; valid: true or false"):
        parse_dataset_config({"datasets": [{**table, "is_validation": "yes"}]})
    with pytest.raises(UserError, match="general: unknown key 'is_validation'"):
        parse_dataset_config({"general": {"is_validation": True}, "datasets": [table]})
