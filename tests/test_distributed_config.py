"""The distributed settings without processes: flag combinations refused at start-up, accelerate's FSDP environment,
the default collective timeout, the per-rank batch sharding, and the per-rank --fsdp memory plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from kandinsky5.common import UserError
from tests.helpers import load_module
from tests.test_train_cli import base_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    return load_module(ROOT / "kandinsky5_train_network.py", "_train_script_distributed_config")


def _cfg(script, tmp_path, *extra):
    from kandinsky5 import cli

    args = base_args(tmp_path, tmp_path / "dataset.toml", tmp_path / "out") + list(extra)
    return script.config_from_args(cli.parse_args(script.build_parser(), args))


@pytest.mark.parametrize(
    "extra, env, message",
    [
        (["--fsdp", "--blocks_to_swap", "2"], {}, "--blocks_to_swap 2 cannot be combined with --fsdp"),
        (["--fsdp", "--ddp_static_graph"], {}, "--ddp_static_graph is a DDP setting"),
        (["--fsdp", "--ddp_gradient_as_bucket_view"], {}, "--ddp_gradient_as_bucket_view is a DDP setting"),
        (["--fsdp", "--offload_dit_during_sampling"], {}, "--offload_dit_during_sampling cannot move a sharded DiT"),
        (["--ddp_static_graph", "--network_args", "module_dropout=0.2"], {}, "module_dropout skips branches"),
        (["--ddp_timeout", "0"], {}, "--ddp_timeout must be > 0"),
        (["--blocks_to_swap", "1"], {"ACCELERATE_USE_FSDP": "true"}, "cannot be combined with --fsdp"),
        ([], {"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params is not supported"),
        (["--fsdp", "--optimizer_type", "Adafactor"], {}, "cannot step the sharded parameters of --fsdp"),
    ],
)
def test_impossible_combinations_fail_in_one_line_before_any_model_loads(
    script, tmp_path, monkeypatch, extra, env, message
):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match=message) as info:
        _cfg(script, tmp_path, *extra)
    assert "\n" not in str(info.value)


def test_accelerate_use_fsdp_and_the_ddp_flags_reach_the_config(script, tmp_path, monkeypatch):
    plain = _cfg(script, tmp_path, "--ddp_gradient_as_bucket_view", "--ddp_static_graph", "--ddp_timeout", "90")
    d = plain.distributed
    assert not d.fsdp and d.gradient_as_bucket_view and d.static_graph and d.timeout_minutes == 90
    assert _cfg(script, tmp_path, "--fsdp").distributed.fsdp
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --use_fsdp / accelerate config
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    d = _cfg(script, tmp_path).distributed
    assert d.fsdp and not d.reshard_after_forward


def test_default_timeout_grows_with_the_sampling_work():
    from kandinsky5.configs import get_task
    from kandinsky5.sampling.pipeline import GenerationRequest, SamplingSpec
    from kandinsky5.train.distributed import default_timeout_minutes

    pro, lite = get_task("k5-pro-t2v-5s-sd"), get_task("k5-lite-t2v-5s-sd")
    assert default_timeout_minutes(pro, []) == 60

    def request(task, **kw):
        return GenerationRequest("a cat", SamplingSpec.from_task(task, **kw))

    sd = request(pro, width=768, height=512, frames=121, steps=50)  # 31 x 32 x 48 = 47,616 tokens: 20 min
    assert default_timeout_minutes(pro, [sd]) == 60 + 2 * 20
    assert default_timeout_minutes(pro, [sd, sd]) == 60 + 2 * 40
    assert default_timeout_minutes(lite, [request(lite, width=768, height=512, frames=121, steps=50)]) == 60 + 2 * 4


def test_fewer_batches_than_ranks_gives_every_rank_the_same_count(tmp_path):
    from dataclasses import replace

    from dataset.latent_dataset import BucketBatchSampler, CachedItem

    item = CachedItem(tmp_path / "a", tmp_path / "t", (3, 16, 16), 0, 1, 1)
    for n_items, world in ((1, 4), (3, 2), (5, 4), (2, 8)):
        items = [replace(item, latent_path=tmp_path / f"{i}") for i in range(n_items)]
        ranks = [BucketBatchSampler(items, seed=1, rank=r, world_size=world) for r in range(world)]
        counts = {len(list(r)) for r in ranks}
        assert counts == {ranks[0].batches_per_epoch} and ranks[0].batches_per_epoch >= 1, (n_items, world, counts)
        assert sorted({i for r in ranks for b in r for i in b}) == list(range(n_items))  # every item is used
    with pytest.raises(UserError, match="yields no batches"):
        BucketBatchSampler([], seed=1)


def test_fsdp_memory_plan_per_rank():
    import torch

    from kandinsky5.configs import get_task
    from kandinsky5.memory_plan import memory_plan, sharded_plan
    from kandinsky5.model.dit import DiT

    with torch.device("meta"):
        pro = DiT(get_task("k5-pro-t2v-5s-sd").dit)
    full = memory_plan(pro, torch.bfloat16).total
    plans = {n: sharded_plan(pro, torch.bfloat16, n) for n in (1, 2, 4, 8)}
    assert all(p.full == full for p in plans.values())
    assert plans[2].shard == pytest.approx(full / 2, rel=1e-3) and plans[8].shard == pytest.approx(full / 8, rel=1e-3)
    assert plans[2].gather == plans[8].gather == 2 * 688_079_872  # two visual blocks whole, bf16
    assert plans[8].peak < plans[4].peak < plans[2].peak < full
    assert "peak per rank" in plans[4].table() and "over 4 rank(s)" in plans[4].table()
