"""LoRA training: objective, I2V inputs, batching, optimizers, data order, resume, errors (CPU, tiny models).

``write_toy_cache`` builds a cache directly with ``dataset.cache`` writers (random latents (T, h, w, 16) and random
text embeddings of different lengths at the tiny widths, Qwen 64 / CLIP 32), so no VAE or text encoder is needed.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dataset.cache import latent_cache_path, text_cache_path, write_latent_cache, write_text_cache
from kandinsky5.common import UserError
from kandinsky5.configs import get_task
from kandinsky5.model import flow
from kandinsky5.model.dit import DiT
from kandinsky5.train.objective import TrainBatch, conditioned_frames, dit_input, flow_matching_loss, masked_mse
from kandinsky5.train.optim import OptimizerConfig, SchedulerConfig, build_optimizer, build_scheduler, parse_kv_args
from tests.helpers import randomize_, rope_without_bf16_rounding

TINY = get_task("k5-tiny-t2v")
TINY_I2V = get_task("k5-tiny-i2v")


# ----------------------------------------------------------------------------------------------------------------
# toy cache (shared with test_train_cli.py and test_ddp.py)
# ----------------------------------------------------------------------------------------------------------------


def write_toy_cache(
    root: Path,
    n_items: int = 4,
    frames: int = 3,
    size: int = 16,
    text_lengths: tuple[int, ...] = (5, 9, 7, 12),
    template: str = "video",
    max_length: int = 256,
    text_dims: tuple[int, int] = (64, 32),
    with_image: bool = True,
    batch_size: int = 2,
    seed: int = 0,
    vae: str = "toy-vae",
) -> Path:
    """Write ``n_items`` cached clips + captions under ``root`` and return the dataset TOML path."""
    gen = torch.Generator().manual_seed(seed)
    cache = root / "cache"
    pixel_frames = (frames - 1) * 4 + 1
    grid = torch.linspace(-1, 1, size)
    for i in range(n_items):
        key = f"clip_{i}.mp4"
        # smooth, item-specific structure plus noise: something a LoRA can memorise
        pattern = torch.sin(3 * grid[:, None] + i) * torch.cos(2 * grid[None, :] - i)
        latents = pattern[None, :, :, None] + 0.3 * torch.randn(frames, size, size, 16, generator=gen)
        image = latents[[0, -1]].clone() if with_image else None
        meta = {
            "vae": vae, "source_size": [size * 8, size * 8], "bucket_size": [size * 8, size * 8],
            "frame_indices": list(range(pixel_frames)), "item_key": key, "nabla_resize": False,
        }  # fmt: skip
        write_latent_cache(latent_cache_path(cache, key, (size * 8, size * 8), 0, pixel_frames), latents, image, meta)
        length = text_lengths[i % len(text_lengths)]
        embeds = torch.randn(length, text_dims[0], generator=gen).to(torch.bfloat16)
        pooled = torch.randn(text_dims[1], generator=gen)
        tmeta = {"template": template, "max_length": max_length, "text_encoder": "toy-te", "task_family": "video",
                 "item_key": key, "caption": f"caption {i}"}  # fmt: skip
        write_text_cache(text_cache_path(cache, key), embeds, pooled, tmeta)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    toml = root / "dataset.toml"
    toml.write_text(
        f'[general]\nresolution = [{size * 8}, {size * 8}]\nbatch_size = {batch_size}\ncaption_extension = ".txt"\n\n'
        f'[[datasets]]\nvideo_directory = "{root / "videos"}"\ncache_directory = "{cache}"\n'
        f"target_frames = [{pixel_frames}]\n"
    )
    return toml


def tiny_dit(seed: int = 0, task=TINY) -> DiT:
    dit = DiT(task.dit)
    randomize_(dit, seed=seed, std=0.05)
    return dit.eval().requires_grad_(False)


def random_batch(b: int = 3, frames: int = 3, size: int = 8, lengths=(4, 9, 6), image: bool = False, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, max(lengths), dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, :n] = True
    embeds = torch.randn(b, max(lengths), 64, generator=gen) * mask[..., None]
    return TrainBatch(
        latents=torch.randn(b, frames, size, size, 16, generator=gen),
        text_embeds=embeds,
        text_mask=mask,
        pooled=torch.randn(b, 32, generator=gen),
        latents_image=torch.randn(b, 2, size, size, 16, generator=gen) if image else None,
    )


# ----------------------------------------------------------------------------------------------------------------
# objective and I2V inputs
# ----------------------------------------------------------------------------------------------------------------


def test_t2v_input_is_latents_then_33_zero_channels():
    x_t = torch.randn(2, 3, 4, 4, 16)
    x_in, weight = dit_input(x_t, None)
    assert x_in.shape == (2, 3, 4, 4, 33) and weight is None
    assert torch.equal(x_in[..., :16], x_t) and not x_in[..., 16:].any()


@pytest.mark.parametrize("mode,frames,expected", [
    ("first", 4, [0]), ("first_last", 4, [0, 3]), ("first_last", 3, [0, 2]), ("first_last", 2, [0]),
    ("first", 2, [0]), ("first", 1, []), ("first_last", 1, []),
])  # fmt: skip
def test_conditioned_frames(mode, frames, expected):
    assert conditioned_frames(frames, mode) == expected


@pytest.mark.parametrize("mode", ["first", "first_last"])
def test_i2v_input_replaces_frames_like_official_inference(mode):
    x_t = torch.randn(2, 5, 4, 4, 16)
    image = torch.randn(2, 2, 4, 4, 16)
    x_in, weight = dit_input(x_t, image, mode)
    cond = [0, 4] if mode == "first_last" else [0]
    free = [f for f in range(5) if f not in cond]
    assert torch.equal(x_in[:, 0, ..., :16], image[:, 0])  # clean first latent in the noisy channels
    if mode == "first_last":
        assert torch.equal(x_in[:, 4, ..., :16], image[:, 1])  # clean last latent at T-1
    assert torch.equal(x_in[:, free, ..., :16], x_t[:, free])  # other frames stay noisy
    assert not x_in[..., 16:32].any()  # cond channels are zero (official), not the image (musubi)
    mask = x_in[..., 32]
    assert torch.equal(mask[:, cond], torch.ones_like(mask[:, cond])) and not mask[:, free].any()
    assert torch.equal(weight, torch.tensor([[0.0 if f in cond else 1.0 for f in range(5)]] * 2))


def test_loss_is_the_flow_matching_equation():
    batch = random_batch()
    t = torch.tensor([0.1, 0.5, 0.9])
    noise = torch.randn_like(batch.latents)
    seen = {}

    def fake_dit(x, text, mask, pooled, time, scale_factor):
        seen.update(x=x, time=time, text=text, scale=scale_factor)
        return torch.full_like(x[..., :16], 0.25)

    loss = flow_matching_loss(fake_dit, batch, t, noise, (1.0, 2.0, 2.0))
    x0 = batch.latents
    expected_xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
    assert torch.allclose(seen["x"][..., :16], expected_xt)
    assert torch.equal(seen["time"], 1000 * t) and seen["time"].dtype == torch.float32
    assert seen["text"].shape == (3, 9, 64)  # one copy of the text per sample, no per-frame repetition
    assert torch.allclose(loss, ((0.25 - (noise - x0)) ** 2).mean())


def test_conditioned_frames_do_not_count_in_the_loss():
    batch = random_batch(image=True)
    t, noise = torch.full((3,), 0.5), torch.randn_like(batch.latents)

    def dit_with_frame0(value):
        def run(x, *args, **kwargs):
            out = torch.zeros_like(x[..., :16])
            out[:, 0] = value
            return out

        return run

    a = flow_matching_loss(dit_with_frame0(0.0), batch, t, noise, (1, 2, 2), "first")
    b = flow_matching_loss(dit_with_frame0(1e3), batch, t, noise, (1, 2, 2), "first")
    assert torch.equal(a, b)
    pred, target = torch.zeros(1, 3, 2, 2, 16), torch.ones(1, 3, 2, 2, 16)
    target[:, 0] = 5.0
    assert masked_mse(pred, target, torch.tensor([[0.0, 1.0, 1.0]])) == 1.0


def _lora(dit, rank=4, seed=3, module="networks.lora_kandinsky"):
    import importlib

    torch.manual_seed(seed)
    network = importlib.import_module(module).create_network(1.0, rank, rank, dit)
    network.apply_to(dit)
    return network


@pytest.mark.parametrize("rounding", ["official bf16 q/k rounding", "no rounding"])
def test_mixed_length_batch_equals_per_sample_loss_and_grads(rounding, monkeypatch):
    """One batched DiT call with padded captions == the mean of per-sample calls, loss and LoRA gradients.

    The DiT rounds q/k to bf16 after RoPE (as official); batched and single matmuls differ in the last fp32 bit,
    which that rounding can amplify to one bf16 ulp, so with it the gradients agree to ~1e-4 globally; without it
    they agree to fp32 round-off per tensor.
    """
    if rounding == "no rounding":
        monkeypatch.setattr("kandinsky5.model.dit.apply_rope", rope_without_bf16_rounding)
    dit = tiny_dit()
    network = _lora(dit)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.05)  # non-zero up weights so every LoRA gradient is non-trivial
    batch = random_batch(lengths=(4, 11, 7))
    t, noise = torch.tensor([0.2, 0.6, 0.95]), torch.randn_like(batch.latents)
    params = list(network.parameters())

    loss = flow_matching_loss(dit, batch, t, noise, TINY.rope_scale)
    grads = torch.autograd.grad(loss, params)
    per_loss, per_grads = [], [torch.zeros_like(p) for p in params]
    for i in range(3):
        n = int(batch.text_mask[i].sum())
        one = TrainBatch(batch.latents[i : i + 1], batch.text_embeds[i : i + 1, :n], batch.text_mask[i : i + 1, :n],
                         batch.pooled[i : i + 1])  # fmt: skip
        li = flow_matching_loss(dit, one, t[i : i + 1], noise[i : i + 1], TINY.rope_scale)
        per_loss.append(li)
        for acc, g in zip(per_grads, torch.autograd.grad(li / 3, params)):
            acc += g
    assert torch.allclose(loss, torch.stack(per_loss).mean(), rtol=1e-6, atol=0)
    flat, ref = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in per_grads])
    worst = max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(grads, per_grads))
    if rounding == "no rounding":
        assert worst < 1e-5, worst
    else:
        assert float((flat - ref).norm() / ref.norm()) < 1e-3


def test_zero_initialised_lora_leaves_the_output_unchanged():
    dit = tiny_dit()
    batch = random_batch(lengths=(5, 8, 3))
    x_in, _ = dit_input(batch.latents, None)
    args = (x_in, batch.text_embeds, batch.text_mask, batch.pooled, torch.tensor([100.0, 500.0, 900.0]))
    before = dit(*args, scale_factor=TINY.rope_scale)
    _lora(dit)
    after = dit(*args, scale_factor=TINY.rope_scale)
    assert torch.equal(before, after)


@pytest.mark.parametrize("module", ["networks.lora_kandinsky", "networks.loha_kandinsky", "networks.lokr_kandinsky"])
def test_overfitting_one_sample_lowers_the_loss_clearly(capsys, module):
    """A few dozen adapter steps on one sample: the loss on a fixed set of (t, noise) must drop by at least half
    (LoRA, LoHa and LoKr alike)."""
    dit = tiny_dit(seed=5)
    network = _lora(dit, rank=8, module=module)
    batch = random_batch(b=1, lengths=(6,), seed=7)
    batch.latents = 2.0 * torch.sin(torch.linspace(0, 6, 16)).view(1, 1, 1, 1, 16).expand(1, 3, 8, 8, 16).clone()
    opt = build_optimizer(network.parameters(), OptimizerConfig("AdamW", 3e-3))
    gen = torch.Generator().manual_seed(0)
    cfg = flow.TimestepConfig(mode="uniform")
    eval_t = torch.linspace(0.05, 0.95, 8)
    eval_noise = torch.randn(8, *batch.latents.shape[1:], generator=gen)
    eval_batch = TrainBatch(batch.latents.expand(8, -1, -1, -1, -1), batch.text_embeds.expand(8, -1, -1),
                            batch.text_mask.expand(8, -1), batch.pooled.expand(8, -1))  # fmt: skip

    def eval_loss():
        with torch.no_grad():
            return float(flow_matching_loss(dit, eval_batch, eval_t, eval_noise, TINY.rope_scale))

    curve = [eval_loss()]
    for step in range(40):
        t = flow.sample_timesteps(cfg, 4, generator=gen)
        noise = torch.randn(4, *batch.latents.shape[1:], generator=gen)
        four = TrainBatch(*(x.expand(4, *x.shape[1:]) for x in (batch.latents, batch.text_embeds, batch.text_mask,
                                                                  batch.pooled)))  # fmt: skip
        loss = flow_matching_loss(dit, four, t, noise, TINY.rope_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9:
            curve.append(eval_loss())
    with capsys.disabled():
        print(f"\n{module} overfit eval loss every 10 steps:", " ".join(f"{v:.4f}" for v in curve))
    assert curve[-1] < 0.5 * curve[0], curve


# ----------------------------------------------------------------------------------------------------------------
# optimizers, schedules, args
# ----------------------------------------------------------------------------------------------------------------


def test_kv_args_use_literal_eval_only():
    args = parse_kv_args(["weight_decay=0.001", "betas=(0.9,0.95)", "include_patterns=['.*modulation.*']",
                          "flag=True", "name=adam", "expr=__import__('os')"], "--optimizer_args")  # fmt: skip
    assert args == {"weight_decay": 0.001, "betas": (0.9, 0.95), "include_patterns": [".*modulation.*"],
                    "flag": True, "name": "adam", "expr": "__import__('os')"}  # fmt: skip
    with pytest.raises(UserError, match="key=value"):
        parse_kv_args(["oops"], "--optimizer_args")


@pytest.mark.parametrize("name,cls", [
    ("AdamW", "AdamW"), ("adamw", "AdamW"), ("AdamW8Bit", "AdamW8bit"), ("adafactor", "Adafactor"),
    ("SGD", "SGD"), ("torch.optim.RMSprop", "RMSprop"),
])  # fmt: skip
def test_optimizer_types(name, cls):
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = build_optimizer([p], OptimizerConfig(name, 1e-3, {"weight_decay": 0.001} if cls != "SGD" else {}))
    assert type(opt).__name__ == cls
    p.grad = torch.randn_like(p)
    opt.step()


def test_unknown_optimizer_is_a_user_error():
    with pytest.raises(UserError, match="unknown --optimizer_type"):
        build_optimizer([torch.nn.Parameter(torch.ones(2))], OptimizerConfig("Adamx"))
    with pytest.raises(UserError, match="cannot import"):
        build_optimizer([torch.nn.Parameter(torch.ones(2))], OptimizerConfig("nopackage.Opt"))


def test_constant_with_warmup_and_fractional_warmup():
    p = torch.nn.Parameter(torch.ones(2))
    opt = build_optimizer([p], OptimizerConfig("AdamW", 1.0))
    sched = build_scheduler(opt, SchedulerConfig("constant_with_warmup", 4), total_steps=100)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    opt2 = build_optimizer([p], OptimizerConfig("AdamW", 1.0))
    sched2 = build_scheduler(opt2, SchedulerConfig("linear", 0.1), total_steps=50)  # 10 % = 5 warmup steps
    for _ in range(5):
        opt2.step()
        sched2.step()
    assert math.isclose(opt2.param_groups[0]["lr"], 1.0)
    with pytest.raises(UserError, match="unknown --lr_scheduler"):
        build_scheduler(opt, SchedulerConfig("cosine_wrong"), 10)


# ----------------------------------------------------------------------------------------------------------------
# data: discovery, batching, order
# ----------------------------------------------------------------------------------------------------------------


def test_bucket_sampler_is_deterministic_sharded_and_skippable(tmp_path):
    from dataset.config import load_dataset_config
    from dataset.latent_dataset import BucketBatchSampler, discover_items

    toml = write_toy_cache(tmp_path, n_items=5, batch_size=2)
    items = discover_items(load_dataset_config(toml), TINY)
    one = BucketBatchSampler(items, seed=3)
    assert one.batches_per_epoch == 3 and list(one) == list(BucketBatchSampler(items, seed=3))
    one.set_epoch(1)
    assert sorted(i for b in one for i in b) == [0, 1, 2, 3, 4]
    ranks = [BucketBatchSampler(items, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(1)
    shards = [list(r) for r in ranks]
    assert len(shards[0]) == len(shards[1]) == 2  # 3 batches padded to 4
    one.set_epoch(1, skip=2)
    assert list(one) == list(BucketBatchSampler(items, seed=3).epoch_batches(1))[2:]


def test_collate_pads_captions_and_keeps_one_copy(tmp_path):
    from dataset.config import load_dataset_config
    from dataset.latent_dataset import LatentDataset, collate, discover_items

    toml = write_toy_cache(tmp_path, n_items=2, text_lengths=(3, 8))
    items = discover_items(load_dataset_config(toml), TINY_I2V)
    batch = collate([LatentDataset(items, with_image=True)[i] for i in range(2)])
    assert batch["latents"].shape == (2, 3, 16, 16, 16) and batch["latents_image"].shape == (2, 2, 16, 16, 16)
    assert batch["text_embeds"].shape == (2, 8, 64) and batch["text_mask"].sum(1).tolist() == [3, 8]
    assert not batch["text_embeds"][0, 3:].any()


def test_cache_problems_name_the_stage_to_rerun(tmp_path):
    from dataset.config import load_dataset_config
    from dataset.latent_dataset import discover_items

    cases = {
        "template": dict(template="image"),
        "max_length": dict(max_length=512),
        "widths": dict(text_dims=(3584, 768)),
    }
    for name, kwargs in cases.items():
        toml = write_toy_cache(tmp_path / name, n_items=1, **kwargs)
        with pytest.raises(UserError, match="kandinsky5_cache_text_encoder_outputs.py"):
            discover_items(load_dataset_config(toml), TINY)
    toml = write_toy_cache(tmp_path / "noimage", n_items=1, with_image=False)
    with pytest.raises(UserError, match="latents_image.*kandinsky5_cache_latents.py"):
        discover_items(load_dataset_config(toml), TINY_I2V)
    toml = write_toy_cache(tmp_path / "empty", n_items=1)
    for f in (tmp_path / "empty" / "cache").glob("*_k5.safetensors"):
        f.unlink()
    with pytest.raises(UserError, match="no latent caches.*kandinsky5_cache_latents.py"):
        discover_items(load_dataset_config(toml), TINY)
    toml = write_toy_cache(tmp_path / "notext", n_items=1)
    for f in (tmp_path / "notext" / "cache").glob("*_te.safetensors"):
        f.unlink()
    with pytest.raises(UserError, match="text cache not found.*kandinsky5_cache_text_encoder_outputs.py"):
        discover_items(load_dataset_config(toml), TINY)


# ----------------------------------------------------------------------------------------------------------------
# save / resume through the script
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["networks.lora_kandinsky", "networks.lokr_kandinsky"])
def test_three_steps_resume_three_steps_equals_six_straight(tiny_bundle, tmp_path, module):
    """Resume restores the adapter, AdamW moments, the LR schedule (mid-warmup), dropout and noise RNG, and the
    position in a half-finished epoch: the resumed run ends with bit-identical weights (LoRA, and LoKr: the state
    is the network's own state_dict for every adapter kind)."""
    from safetensors.torch import load_file

    from tests.test_train_cli import base_args, train

    toml = write_toy_cache(tmp_path / "data", n_items=4, batch_size=1)  # 4 steps per epoch: step 3 is mid-epoch
    extra = ["--lr_scheduler", "linear", "--lr_warmup_steps", "2", "--network_dropout", "0.1",
             "--optimizer_args", "weight_decay=0.01", "--network_args", "rank_dropout=0.1",
             "--network_module", module]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = base_args(tiny_bundle, toml, straight, steps=6) + extra
    assert train(args + ["--save_every_n_steps", "3", "--save_state"]) == 0
    state = straight / "lora-step00000003-state"
    assert (state / "progress.json").is_file() and not list(straight.glob(".*tmp*"))
    assert train(base_args(tiny_bundle, toml, resumed, steps=6) + extra + ["--resume", str(state)]) == 0
    a, b = load_file(straight / "lora.safetensors"), load_file(resumed / "lora.safetensors")
    assert a.keys() == b.keys()
    assert all(bool(torch.equal(a[k], b[k])) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)
    step3 = load_file(straight / "lora-step00000003.safetensors")
    assert any(not torch.equal(a[k], step3[k]) for k in a)  # steps 4-6 did change the weights


def test_rotation_keeps_the_newest_checkpoints(tmp_path):
    from kandinsky5.train.state import rotate

    for step in (2, 4, 6, 8):
        (tmp_path / f"lora-step{step:08d}.safetensors").write_bytes(b"x")
        (tmp_path / f"lora-step{step:08d}-state").mkdir()
    (tmp_path / "lora-step00000010.safetensors").write_bytes(b"x")  # from a longer earlier run: left alone
    rotate(tmp_path, r"lora-step(\d+)(?:\.safetensors|-state)", keep=2, current=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "lora-step00000006-state", "lora-step00000006.safetensors", "lora-step00000008-state",
        "lora-step00000008.safetensors", "lora-step00000010.safetensors",
    ]  # fmt: skip


def test_resume_with_a_longer_schedule_uses_the_new_schedule_at_once():
    from transformers import get_scheduler

    from kandinsky5.train.run import _recompute_lr

    def sched(total):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        return opt, get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=total)

    opt6, s6 = sched(6)
    for _ in range(6):
        opt6.step()
        s6.step()
    opt10, s10 = sched(10)
    opt10.load_state_dict(opt6.state_dict())
    s10.load_state_dict(s6.state_dict())
    assert opt10.param_groups[0]["lr"] == 0.0  # the 6-step schedule's last value came back with the state
    _recompute_lr(s10)
    _, fresh = sched(10)
    for _ in range(6):
        fresh.step()
    assert (
        opt10.param_groups[0]["lr"] == pytest.approx(fresh.get_last_lr()[0])
        and s10.get_last_lr() == fresh.get_last_lr()
    )
