"""MagCache: skip decisions and latents against the official ``magcache_utils`` rule (re-derived here, and the
official file itself run from the peer mirror when it exists), zero threshold == plain sampler, composition with
batched CFG / I2V / fp8 / LoRA / block swap, calibration round trip, the official ratio data and the errors."""

from __future__ import annotations

import json
import re
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from kandinsky5.cli import run_main
from kandinsky5.configs import TASKS, TINY_DIT, get_task
from kandinsky5.model import flow
from kandinsky5.model.dit import DiT, text_rope, visual_rope
from kandinsky5.model.text_encoders import TextEmbeds
from kandinsky5.sampling import magcache as mc
from kandinsky5.sampling.pipeline import SamplingSpec, dit_input, initial_noise, sample_latents
from tests.helpers import load_module, randomize_, rel_close

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_REPO = Path("/work/.mirror/kandinskylab+kandinsky-5/repo")


def _official_source(path: str) -> str | None:
    """A file of the official repo from the local peer mirror (never committed here), or None."""
    if not OFFICIAL_REPO.exists():
        return None
    out = subprocess.run(["git", "-C", str(OFFICIAL_REPO), "show", f"HEAD:{path}"], capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else None


@pytest.fixture(scope="module")
def official():
    """The official ``kandinsky/magcache_utils.py`` as a module (it imports only numpy, torch and types)."""
    src = _official_source("kandinsky/magcache_utils.py")
    if src is None:
        pytest.skip("official kandinsky-5 mirror not available")
    module = types.ModuleType("official_magcache_utils")
    exec(compile(src, "magcache_utils.py", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def dit() -> DiT:
    torch.manual_seed(0)
    return randomize_(DiT(TINY_DIT), seed=1).eval()


def _text(length: int, seed: int) -> TextEmbeds:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, length, TINY_DIT.in_text_dim, generator=g)
    return TextEmbeds(emb, torch.ones(1, length, dtype=torch.bool), torch.randn(1, TINY_DIT.in_text_dim2, generator=g))


def _ratios(steps: int, seed: int, spread: float = 0.03, uncond_shift: float = 0.0) -> tuple[float, ...]:
    """Official-layout ratios near 1; ``uncond_shift`` moves the uncond stream away so the streams decide apart."""
    rng = np.random.RandomState(seed)
    values = 1 + rng.randn(2 * (steps - 1)) * spread
    values[1::2] += uncond_shift
    return tuple(float(v) for v in np.round(values, 5))


def _config(ratios, steps, **knobs) -> mc.MagCacheConfig:
    return mc.MagCacheConfig(mc.MagRatios(tuple(ratios), steps, "test"), **knobs)


# ----------------------------------------------------------------------------------------------------------------
# the rule, re-derived from its documentation (kandinsky/magcache_utils.py, set_magcache_params + magcache_forward)
# ----------------------------------------------------------------------------------------------------------------


def documented_rule(ratios, calibrated_steps, steps, cfg, thresh=0.12, K=2, retention=0.2):
    """Call order [(step, stream, skipped)] written from the documented rule, independently of magcache.py."""
    table = [1.0, 1.0, *ratios]
    if len(table) != 2 * steps:  # nearest_interp per stream, np.round = round half to even
        per = []
        for s in (0, 1):
            src = table[s::2]
            idx = [len(src) - 1] if steps == 1 else [round(i * (len(src) - 1) / (steps - 1)) for i in range(steps)]
            per.append([src[i] for i in idx])
        table = [per[c % 2][c // 2] for c in range(2 * steps)]
    acc = {s: [1.0, 0, 0.0] for s in (0, 1)}  # ratio, steps, err
    have_residual, out = set(), []
    for k in range(steps):
        for s in (0, 1) if cfg else (0,):
            cnt, skip = 2 * k + s, False
            if cnt >= int(2 * steps * retention):
                acc[s][0] *= table[cnt]
                acc[s][1] += 1
                acc[s][2] += abs(1 - acc[s][0])
                skip = acc[s][2] < thresh and acc[s][1] <= K and s in have_residual
                if not skip:
                    acc[s] = [1.0, 0, 0.0]
            have_residual.add(s)
            out.append((k, s, skip))
    return out


def _decisions(config: mc.MagCacheConfig, steps: int, cfg: bool) -> list[tuple[int, int, bool]]:
    """Decisions of our state machine (they depend only on the ratio table, not on tensors)."""
    run = config.start(steps, cfg)
    for k in range(steps):
        fn = run.blocks(k, (0, 1) if cfg else (0,))
        fn(lambda t, *rest: t * 2, torch.ones(2 if cfg else 1, 3, 4), *([None] * 5))  # stores the residuals
    return run.decisions


RULE_CASES = [
    dict(steps=10, cfg=True),
    dict(steps=10, cfg=False),
    dict(steps=50, cfg=True, spread=0.01),
    dict(steps=8, cfg=True, calibrated=50),  # resampled down (official nearest_interp)
    dict(steps=73, cfg=True, calibrated=50, spread=0.01),  # resampled up
    dict(steps=12, cfg=True, uncond_shift=0.08),  # the streams decide apart
    dict(steps=12, cfg=True, thresh=1.0, K=0),  # K = 0: never skips
    dict(steps=12, cfg=True, thresh=10.0, K=5, retention=0.0),  # retention 0: no residual yet at call 0
    dict(steps=12, cfg=True, thresh=10.0, retention=1.0),
    dict(steps=1, cfg=True, calibrated=50, thresh=10.0, retention=0.0),
]


@pytest.mark.parametrize("case", RULE_CASES)
def test_decisions_follow_the_documented_rule(case):
    case = dict(case)
    steps, cfg = case.pop("steps"), case.pop("cfg")
    calibrated = case.pop("calibrated", steps)
    ratios = _ratios(calibrated, 0, case.pop("spread", 0.03), case.pop("uncond_shift", 0.0))
    knobs = {k: case[k] for k in ("thresh", "K") if k in case}
    if "retention" in case:
        knobs["retention_ratio"] = case["retention"]
    ours = _decisions(_config(ratios, calibrated, **knobs), steps, cfg)
    rule_knobs = {"retention" if k == "retention_ratio" else k: v for k, v in knobs.items()}
    assert ours == documented_rule(ratios, calibrated, steps, cfg, **rule_knobs)


def test_official_defaults_skip_on_the_official_pro_ratios():
    """Pro 5 s SD with the official knobs: a real share of the 100 calls is skipped, none in the first 20."""
    config = mc.MagCacheConfig(mc.official_ratios(get_task("k5-pro-t2v-5s-sd")))
    decisions = _decisions(config, 50, True)
    skipped = [2 * k + s for k, s, skip in decisions if skip]
    assert (config.thresh, config.K, config.retention_ratio) == (0.12, 2, 0.2)
    assert len(skipped) == 52 and min(skipped) >= 20  # docs/performance.md
    assert len(skipped) == sum(d[2] for d in documented_rule(config.ratios.values, 50, 50, True))


def test_nearest_interp_and_table_equal_official(official):
    ratios = mc.official_ratios(get_task("k5-lite-t2v-5s-sd"))
    for steps in (1, 2, 7, 30, 50, 64):
        table = np.array([1.0, 1.0, *ratios.values])
        if steps != 50:
            con = official.nearest_interp(table[0::2], steps)
            ucon = official.nearest_interp(table[1::2], steps)
            table = np.concatenate([con.reshape(-1, 1), ucon.reshape(-1, 1)], axis=1).reshape(-1)
        assert np.array_equal(mc.ratio_table(ratios, steps), table), steps


# ----------------------------------------------------------------------------------------------------------------
# the official file on the same tiny DiT
# ----------------------------------------------------------------------------------------------------------------


class OfficialLayout:
    """Our tiny DiT cut into the pieces official ``magcache_forward`` calls; records which calls ran the blocks."""

    def __init__(self, dit: DiT):
        self.dit, self.ran = dit, []
        self.text_transformer_blocks = [self._text_block(b) for b in dit.text_transformer_blocks]
        self.visual_transformer_blocks = [self._visual_block(i, b) for i, b in enumerate(dit.visual_transformer_blocks)]

    def _text_block(self, block):
        return lambda text, time_embed, rope, mask: block(text, time_embed, rope, mask)

    def _visual_block(self, index, block):
        def run(visual, text, time_embed, rope, sparse_params, mask):
            if index == 0:
                self.ran.append(self.cnt)
            return block(visual, text, time_embed, rope, mask, self.dit._dense_attend)

        return run

    def before_text_transformer_blocks(self, text_embed, time, pooled, x, text_rope_pos):
        d = self.dit
        time_embed = d.time_embeddings(time) + d.pooled_text_embeddings(pooled).float()
        text = d.text_embeddings(text_embed)
        return text, time_embed, text_rope(text.shape[1], d.config.head_dim, text.device), d.visual_embeddings(x)

    def before_visual_transformer_blocks(self, visual, visual_rope_pos, scale_factor, sparse_params):
        rope = visual_rope(tuple(visual.shape[1:4]), self.dit.config.axes_dims, scale_factor, visual.device)
        return visual.flatten(1, 3), visual.shape, False, rope

    def after_blocks(self, visual, shape, to_fractal, text, time_embed):
        return self.dit.out_layer(visual.view(shape), time_embed)


def official_sample(official, dit, ratios, spec, cond, uncond):
    """Official set_magcache_params + magcache_forward driven by the official loop (cond call, then uncond)."""
    model = OfficialLayout(dit)
    cfg = flow.needs_uncond(spec.guidance)
    official.set_magcache_params(model, list(ratios), spec.steps, not cfg)
    x = initial_noise(spec)
    sigmas = flow.sampling_sigmas(spec.steps, spec.scheduler_scale)
    for k in range(spec.steps):
        model_in, time = dit_input(x, False, False), (sigmas[k] * 1000).reshape(1)
        calls = [model.forward(model_in, te.embeds, te.pooled, time, None, None, spec.rope_scale)
                 for te in ((cond, uncond) if cfg else (cond,))]  # fmt: skip
        v = flow.cfg_combine(calls[0].float(), calls[1].float(), spec.guidance) if cfg else calls[0].float()
        x = flow.euler_step(x, v, sigmas[k], sigmas[k + 1])
    return x, model.ran


def two_call_sample(dit, config, spec, cond, uncond):
    """Our MagCache with one DiT call per stream (the official CFG layout)."""
    run = config.start(spec.steps, True)
    x = initial_noise(spec)
    sigmas = flow.sampling_sigmas(spec.steps, spec.scheduler_scale)
    for k in range(spec.steps):
        model_in, time = dit_input(x, False, False), flow.dit_time(sigmas[k]).expand(1)
        v = [dit(model_in, te.embeds, te.mask, te.pooled, time, scale_factor=spec.rope_scale,
                 visual_blocks=run.blocks(k, (s,))).float() for s, te in enumerate((cond, uncond))]  # fmt: skip
        x = flow.euler_step(x, flow.cfg_combine(v[0], v[1], spec.guidance), sigmas[k], sigmas[k + 1])
    return x, run


def _ran(run: mc.MagCache) -> list[int]:
    return [2 * k + s for k, s, skipped in run.decisions if not skipped]


OFFICIAL_CASES = [
    dict(guidance=5.0, calibrated=10),
    dict(guidance=1.0, calibrated=10),
    dict(guidance=5.0, calibrated=12, uncond_shift=0.06),  # cond and uncond decide apart: partial batched calls
    dict(guidance=5.0, calibrated=50, spread=0.01),  # official resampling 50 -> 10
]


@pytest.mark.parametrize("case", OFFICIAL_CASES)
def test_decisions_and_latents_equal_the_official_file(official, dit, case):
    spec = SamplingSpec(64, 64, 9, 10, case["guidance"], 5.0, seed=3)
    ratios = _ratios(case["calibrated"], 1, case.get("spread", 0.03), case.get("uncond_shift", 0.0))
    config = _config(ratios, case["calibrated"])
    cond, uncond = _text(5, 1), _text(9, 2)
    with torch.no_grad():
        ref, ref_ran = official_sample(official, dit, ratios, spec, cond, uncond)
        run = config.start(spec.steps, flow.needs_uncond(spec.guidance))
        batched = sample_latents(dit, cond, uncond, spec, progress=False, cache=run, cfg_mode="batched")
        if flow.needs_uncond(spec.guidance):
            two_calls, two_run = two_call_sample(dit, config, spec, cond, uncond)
            assert _ran(two_run) == ref_ran
            assert torch.equal(two_calls, ref)  # the official call layout: bit-exact
            sampler_run = config.start(spec.steps, True)  # the sampler's own --cfg_mode two_calls
            sampler = sample_latents(dit, cond, uncond, spec, progress=False, cache=sampler_run, cfg_mode="two_calls")
            assert _ran(sampler_run) == ref_ran
            assert torch.equal(sampler, ref)
    assert run.skipped > 0 and _ran(run) == ref_ran
    if flow.needs_uncond(spec.guidance):
        # one batched call for both streams: the project's batched-vs-separate tolerance (test_pipeline.py)
        ok, rel = rel_close(batched, ref, 1e-4)
        assert ok, rel
    else:
        assert torch.equal(batched, ref)


# ----------------------------------------------------------------------------------------------------------------
# exactness and composition
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_mode", ["batched", "two_calls"])
@pytest.mark.parametrize("mode", ["t2v", "i2v", "first_last", "no_cfg"])
def test_zero_threshold_is_the_plain_sampler_bit_exact(dit, mode, cfg_mode):
    spec = SamplingSpec(64, 48, 13, 6, 1.0 if mode == "no_cfg" else 5.0, 5.0, seed=4)
    g = torch.Generator().manual_seed(5)
    first = torch.randn(1, 1, 6, 8, 16, generator=g) if mode in ("i2v", "first_last") else None
    last = torch.randn(1, 1, 6, 8, 16, generator=g) if mode == "first_last" else None
    cond, uncond = _text(5, 1), _text(8, 2)
    ratios = (1.0,) * (2 * (spec.steps - 1))  # all ones: any positive threshold would skip
    run = _config(ratios, spec.steps, thresh=0.0).start(spec.steps, mode != "no_cfg")
    with torch.no_grad():
        plain = sample_latents(dit, cond, uncond, spec, first, last, progress=False, cfg_mode=cfg_mode)
        cached = sample_latents(dit, cond, uncond, spec, first, last, progress=False, cache=run, cfg_mode=cfg_mode)
    assert run.skipped == 0 and run.calls == spec.steps * (1 if mode == "no_cfg" else 2)
    assert torch.equal(plain, cached)


def test_batched_partial_calls_equal_one_call_per_stream(dit):
    """Streams that decide apart in one batched call (only the running rows go through the blocks)."""
    spec = SamplingSpec(64, 64, 9, 12, 5.0, 5.0, seed=6)
    config = _config(_ratios(12, 2, 0.03, 0.06), 12)
    cond, uncond = _text(6, 3), _text(4, 4)
    with torch.no_grad():
        run = config.start(spec.steps, True)
        batched = sample_latents(dit, cond, uncond, spec, progress=False, cache=run, cfg_mode="batched")
        separate, separate_run = two_call_sample(dit, config, spec, cond, uncond)
        sampler_run = config.start(spec.steps, True)
        sampler = sample_latents(dit, cond, uncond, spec, progress=False, cache=sampler_run, cfg_mode="two_calls")
    split = [k for k in range(spec.steps) if run.decisions[2 * k][2] != run.decisions[2 * k + 1][2]]
    assert split and run.decisions == separate_run.decisions == sampler_run.decisions
    assert torch.equal(sampler, separate)
    ok, rel = rel_close(batched, separate, 1e-4)
    assert ok, rel


def test_composes_with_fp8_lora_and_block_swap(dit):
    from tests.test_memory import _prepare  # fp8 layers, a runtime LoRA, simulated block swap (NaN when evicted)

    spec = SamplingSpec(64, 64, 9, 10, 5.0, 5.0, seed=7)
    config = _config(_ratios(10, 3), 10)
    cond, uncond = _text(5, 5), _text(7, 6)
    outs = {}
    with torch.no_grad():
        for swap in (0, 2):
            run = config.start(spec.steps, True)
            model, _net, _, _ = _prepare(dit, swap=swap, fp8=True)
            outs[swap] = sample_latents(model, cond, uncond, spec, progress=False, cache=run)
            assert run.skipped > 0
    assert torch.isfinite(outs[2]).all() and torch.equal(outs[0], outs[2])  # NaN-poisoned evicted blocks unused


def test_skip_count_is_logged(dit, caplog):
    spec = SamplingSpec(64, 64, 9, 10, 5.0, 5.0, seed=3)
    run = _config(_ratios(10, 1), 10).start(spec.steps, True)
    with caplog.at_level("INFO", logger="kandinsky5.sampling.magcache"), torch.no_grad():
        sample_latents(dit, _text(5, 1), _text(5, 2), spec, progress=False, cache=run)
    line = next(r.getMessage() for r in caplog.records if "MagCache: skipped" in r.getMessage())
    assert f"skipped the visual blocks of {run.skipped} of 20 DiT calls" in line


# ----------------------------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------------------------


def test_calibration_measures_the_mean_per_token_residual_norm_ratio():
    """Residual of stream s at step k = c(k, s) * u (u fixed per token): ratio = c(k, s) / c(k - 1, s)."""
    scale = {(k, s): 1.0 + 0.1 * k + 0.5 * s + 0.01 * k * k for k in range(5) for s in (0, 1)}
    cal = mc.Calibrator(get_task("k5-tiny-t2v"))
    rec = cal.start(5, True)
    u = torch.rand(1, 7, 3) + 0.1
    for k in range(5):
        fn = rec.blocks(k, (0, 1))
        step_scale = torch.tensor([scale[(k, 0)], scale[(k, 1)]]).view(2, 1, 1)
        fn(lambda t, *rest, c=step_scale: t + c * u, torch.randn(2, 7, 3), *([None] * 5))
    rec.finish()
    want = [round(scale[(k, s)] / scale[(k - 1, s)], 5) for k in range(1, 5) for s in (0, 1)]
    assert cal.values() == pytest.approx(want, abs=2e-5)


def _generate_main():
    return load_module(ROOT / "kandinsky5_generate_video.py", "kandinsky5_generate_video").main


def _models(bundle: Path) -> list[str]:
    return [
        "--task", "k5-tiny-t2v", "--dit", str(bundle / "model" / "k5_tiny_t2v.safetensors"),
        "--vae", str(bundle / "vae"), "--text_encoder_qwen", str(bundle / "text_encoder"),
        "--text_encoder_clip", str(bundle / "text_encoder2"), "--device", "cpu", "--dtype", "float32",
        "--prompt", "a cat walks on the grass", "--width", "64", "--height", "64", "--frames", "5",
    ]  # fmt: skip


@pytest.mark.slow
def test_calibrate_then_use_round_trips(tiny_bundle, tmp_path, caplog):
    main, ratios = _generate_main(), tmp_path / "ratios.json"
    assert run_main(main, [*_models(tiny_bundle), "--steps", "10", "--magcache_calibrate", str(ratios)]) == 0
    doc = json.loads(ratios.read_text())
    from kandinsky5.model.loading import file_fingerprint

    assert doc["task"] == "k5-tiny-t2v" and doc["steps"] == 10 and doc["cfg"] is True
    assert doc["checkpoint_hash"] == file_fingerprint(tiny_bundle / "model" / "k5_tiny_t2v.safetensors")
    assert len(doc["mag_ratios"]) == 18 and all(v > 0 for v in doc["mag_ratios"])
    read = mc.read_ratios_file(ratios, get_task("k5-tiny-t2v"))
    assert read.values == tuple(doc["mag_ratios"]) and read.steps == 10
    video = tmp_path / "a.mp4"
    argv = [*_models(tiny_bundle), "--steps", "10", "--magcache_ratios", str(ratios), "--magcache_thresh", "0.5"]
    with caplog.at_level("INFO", logger="kandinsky5"):
        assert run_main(main, [*argv, "--save_latents", str(tmp_path / "a.safetensors"), "--output", str(video)]) == 0
    assert video.exists() and "calibrated" not in caplog.text and "resampled" not in caplog.text
    line = next(r.getMessage() for r in caplog.records if "MagCache: skipped" in r.getMessage())
    skipped = int(re.search(r"of (\d+) of 20", line).group(1))
    assert skipped == sum(d[2] for d in documented_rule(read.values, 10, 10, True, thresh=0.5))
    from kandinsky5.sampling.video_io import read_video

    assert "thresh 0.5" in read_video(video)[2]["magcache"]


# ----------------------------------------------------------------------------------------------------------------
# official ratio data
# ----------------------------------------------------------------------------------------------------------------


def test_every_task_with_official_ratios_has_them():
    data = json.loads(mc.OFFICIAL_RATIOS_FILE.read_text())["configs"]
    with_ratios = mc.tasks_with_ratios()
    assert len(with_ratios) == 11 and "k5-pro-t2v-5s-hd" in with_ratios and "k5-pro-i2v-5s-hd" in with_ratios
    assert {TASKS[t].official_config for t in with_ratios} == set(data)
    for name in with_ratios:
        ratios = mc.official_ratios(TASKS[name])
        assert ratios.steps == TASKS[name].steps == 50 and len(ratios.values) == 98
        assert ratios.cfg == flow.needs_uncond(TASKS[name].guidance)
    for name in ("k5-tiny-t2v", "k5-lite-t2v-5s-distil-sd", "k5-lite-t2v-5s-pretrain-sd"):
        assert mc.official_ratios(TASKS[name]) is None


def test_ratio_data_equals_the_official_configs():
    yaml = pytest.importorskip("yaml")
    if _official_source("configs/k5_pro_t2v_5s_sft_sd.yaml") is None:
        pytest.skip("official kandinsky-5 mirror not available")
    data = json.loads(mc.OFFICIAL_RATIOS_FILE.read_text())["configs"]
    for task in TASKS.values():
        if not task.official_config:
            continue
        conf = yaml.safe_load(_official_source(f"configs/{task.official_config}"))
        official = (conf.get("magcache") or {}).get("mag_ratios")
        entry = data.get(task.official_config)
        assert (official is None) == (entry is None), task.name
        if entry is not None:
            assert entry["mag_ratios"] == official and entry["steps"] == conf["model"]["num_steps"], task.name


# ----------------------------------------------------------------------------------------------------------------
# errors: one line, before any model loads
# ----------------------------------------------------------------------------------------------------------------


def _write(path: Path, doc) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _ratio_doc(**changes) -> dict:
    doc = {"format": mc.FILE_FORMAT, "task": "k5-tiny-t2v", "steps": 3, "mag_ratios": [1.0, 1.0, 1.0, 1.0]}
    return {**doc, **changes}


def test_generation_errors_are_one_line(tiny_bundle, tmp_path, capsys):
    main = _generate_main()
    out = ["--output", str(tmp_path / "x.mp4")]
    existing = _write(tmp_path / "existing.json", "{}")
    cases = [
        (["--magcache"], r"task k5-tiny-t2v has no official MagCache ratios \(tasks with them: k5-pro-t2v-5s-sd, "
                         r".*\); run once with --magcache_calibrate FILE, then use --magcache_ratios FILE"),
        (["--magcache_thresh", "0.2"], "--magcache_thresh has no effect without --magcache"),
        (["--magcache_ratios", str(tmp_path / "none.json")], "does not exist .*--magcache_calibrate"),
        (["--magcache_ratios", str(_write(tmp_path / "bad.json", "{nope"))], "bad.json is not valid JSON"),
        (["--magcache_ratios", str(_write(tmp_path / "other.json", {"a": 1}))], "is not a MagCache ratios file"),
        (["--magcache_ratios", str(_write(tmp_path / "task.json", _ratio_doc(task="k5-tiny-i2v")))],
         "calibrated for task 'k5-tiny-i2v', not k5-tiny-t2v"),
        (["--magcache_ratios", str(_write(tmp_path / "len.json", _ratio_doc(steps=4)))], r"2 \* \(steps - 1\)"),
        (["--magcache_ratios", str(_write(tmp_path / "neg.json", _ratio_doc(mag_ratios=[1, -1, 1, 1])))],
         "finite ratios >= 0"),
        (["--magcache_ratios", str(_write(tmp_path / "ok.json", _ratio_doc())), "--magcache_K", "-1"],
         "--magcache_K must be >= 0"),
        (["--magcache_ratios", str(tmp_path / "ok.json"), "--magcache_thresh", "-0.1"], "--magcache_thresh must be"),
        (["--magcache_ratios", str(tmp_path / "ok.json"), "--magcache_retention_ratio", "1.5"], r"in \[0, 1\]"),
        (["--magcache_ratios", str(tmp_path / "ok.json"), "--magcache_calibrate", str(tmp_path / "c.json")],
         "cannot be combined with --magcache"),
        (["--magcache_calibrate", str(existing)], "already exists; pass --overwrite"),
        (["--magcache_calibrate", str(existing / "c.json")], "--magcache_calibrate .* cannot be used"),
        (["--magcache_calibrate", str(tmp_path / "c.json"), "--steps", "1"], "needs at least 2 steps"),
    ]  # fmt: skip
    for extra, message in cases:
        assert run_main(main, [*_models(tiny_bundle), *out, *extra]) == 1, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and re.search(message, err), (extra, err)
    assert not (tmp_path / "x.mp4").exists() and existing.read_text() == "{}"


def test_calibration_prompts_must_share_steps_and_cfg(tiny_bundle, tmp_path, capsys):
    prompts = _write(tmp_path / "p.txt", "a cat --s 4\na dog --s 6\n")
    argv = [*_models(tiny_bundle)[:-8], "--prompt_file", str(prompts), "--magcache_calibrate", str(tmp_path / "c")]
    assert run_main(_generate_main(), argv) == 1
    assert "every prompt needs the same --steps" in capsys.readouterr().err


def test_trainer_flags_and_errors(tiny_bundle, tmp_path, capsys):
    import runpy

    script = runpy.run_path(str(ROOT / "kandinsky5_train_network.py"), run_name="k5_train")
    base = ["--task", "k5-tiny-t2v", "--dit", str(tiny_bundle / "model" / "k5_tiny_t2v.safetensors"),
            "--dataset_config", "d.toml", "--output_dir", str(tmp_path), "--output_name", "x"]  # fmt: skip
    encoders = ["--text_encoder_qwen", "q", "--text_encoder_clip", "c", "--vae", "v", "--sample_prompts", "p.txt"]
    parser = script["build_parser"]()
    ratios = _write(tmp_path / "ok.json", _ratio_doc())
    cfg = script["config_from_args"](parser.parse_args([*base, *encoders, "--magcache_ratios", str(ratios)]))
    assert cfg.sample.magcache.ratios.values == (1.0,) * 4 and cfg.sample.magcache.thresh == 0.12
    lite = ["--task", "k5-lite-t2v-5s-sd", *base[2:], *encoders, "--magcache", "--magcache_K", "3"]
    cfg = script["config_from_args"](parser.parse_args(lite))
    assert cfg.sample.magcache.K == 3 and "k5_lite_t2v_5s_sft_sd.yaml" in cfg.sample.magcache.ratios.source
    for extra, message in [([*encoders, "--magcache"], "has no official MagCache ratios"),
                           (["--magcache"], "it needs --sample_prompts")]:  # fmt: skip
        assert run_main(script["main"], [*base, *extra]) == 1
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_sampling_during_training_uses_magcache(tiny_bundle, tmp_path, caplog):
    from kandinsky5.model.vae import vae_file_identity
    from tests.test_train_cli import base_args, train
    from tests.test_training import write_toy_cache

    toy = write_toy_cache(tmp_path / "toy", n_items=2, vae=vae_file_identity(tiny_bundle / "vae"))
    prompts = _write(tmp_path / "prompts.txt", "A red square slides. --w 64 --h 64 --f 5 --s 8 --g 3 --d 7\n")
    ratios = _write(tmp_path / "r.json", _ratio_doc(steps=8, mag_ratios=[1.0] * 14))
    sampling = [
        "--sample_prompts", str(prompts), "--sample_at_first", "--magcache_ratios", str(ratios),
        "--text_encoder_qwen", str(tiny_bundle / "text_encoder"), "--text_encoder_clip",
        str(tiny_bundle / "text_encoder2"), "--vae", str(tiny_bundle / "vae"),
    ]  # fmt: skip
    with caplog.at_level("INFO", logger="kandinsky5"):
        assert train(base_args(tiny_bundle, toy, tmp_path / "out", steps=1) + sampling) == 0
    # all ratios 1: after the first int(16 * 0.2) = 3 calls each stream skips twice, runs once (K = 2)
    assert "skipped the visual blocks of 9 of 16 DiT calls (cond 4/8, uncond 5/8)" in caplog.text
    assert (tmp_path / "out" / "sample" / "lora_000000_00_7.mp4").exists()
