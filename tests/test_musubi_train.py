"""musubi-tuner trainer habits: scheduler arguments, LoRA+, every timestep mode and loss weighting, --show_timesteps,
state rotation, epochs-vs-steps, checks before the DiT loads, and the start-up log of differing defaults."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch

from kandinsky5.common import UserError
from kandinsky5.model import flow
from kandinsky5.train import optim
from kandinsky5.train.objective import masked_mse
from kandinsky5.train.regularize import max_norm_
from tests.test_train_cli import base_args, toy, train  # noqa: F401 -- toy is a fixture

# ---- schedules ----------------------------------------------------------------------------------------------------


def _lrs(sched: optim.SchedulerConfig, total: int = 10, lr: float = 1.0) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = optim.build_optimizer([param], optim.OptimizerConfig("SGD", lr))
    scheduler = optim.build_scheduler(opt, sched, total)
    out = []
    for _ in range(total):
        out.append(scheduler.get_last_lr()[0])
        opt.step()
        scheduler.step()
    return out


def test_cosine_with_min_lr_via_ratio_or_scheduler_args():
    by_ratio = _lrs(optim.SchedulerConfig("cosine_with_min_lr", min_lr_ratio=0.1), total=100)
    by_args = _lrs(optim.SchedulerConfig("cosine_with_min_lr", args={"min_lr": 0.1}), total=100)
    assert by_ratio == pytest.approx(by_args) and by_ratio[0] == 1.0 and 0.1 <= by_ratio[-1] < 0.11
    with pytest.raises(UserError, match="needs --lr_scheduler_min_lr_ratio or --lr_scheduler_args min_lr="):
        _lrs(optim.SchedulerConfig("cosine_with_min_lr"))


def test_warmup_stable_decay_phases():
    lrs = _lrs(optim.SchedulerConfig("warmup_stable_decay", warmup=0.2, decay=4, min_lr_ratio=0.0))
    assert lrs[:2] == [0.0, 0.5] and lrs[2:6] == [1.0] * 4  # 2 warmup steps, 4 stable steps
    assert lrs[6] == 1.0 and lrs[7] > lrs[8] > lrs[9] > 0  # 4 cosine decay steps
    with pytest.raises(UserError, match=r"--lr_warmup_steps \(2\) \+ --lr_decay_steps \(9\) exceed the 10 steps"):
        _lrs(optim.SchedulerConfig("warmup_stable_decay", warmup=2, decay=9))


def test_rex_inverse_sqrt_custom_class_and_bad_args():
    rex = _lrs(optim.SchedulerConfig("rex", warmup=2), total=12)
    assert rex[0] == pytest.approx(0.01) and rex[2] == pytest.approx(1.0) and rex[-1] < rex[2]
    assert _lrs(optim.SchedulerConfig("inverse_sqrt", warmup=0, timescale=4))[8] == pytest.approx(1 / math.sqrt(3))
    step = _lrs(optim.SchedulerConfig(type="StepLR", args={"step_size": 3, "gamma": 0.5}))
    assert step[:4] == [1.0, 1.0, 1.0, 0.5]
    with pytest.raises(UserError, match=r"^--lr_scheduler cosine: .*'bogus' \(fix --lr_scheduler_args"):
        _lrs(optim.SchedulerConfig("cosine", args={"bogus": 1}))
    with pytest.raises(UserError, match="--lr_scheduler_type NoSuchLR: no such class"):
        optim.check_configs(optim.OptimizerConfig(), optim.SchedulerConfig(type="NoSuchLR"))


def test_adafactor_schedule_with_musubi_initial_lr():
    config = optim.OptimizerConfig("Adafactor", 1e-4, {"relative_step": True})
    opt = optim.build_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], config)
    optim.check_configs(config, optim.SchedulerConfig("adafactor:1e-3"))
    assert optim.build_scheduler(opt, optim.SchedulerConfig("adafactor:1e-3"), 10).get_last_lr() == [1e-3]


def test_steps_or_fraction_accepts_musubi_percentages():
    assert [optim.steps_or_fraction(v) for v in ("100", "0.05", "5%")] == [100.0, 0.05, 0.05]
    assert optim.warmup_steps(optim.SchedulerConfig(warmup=0.05), 200) == 10


def test_loraplus_param_groups():
    named = [
        ("a.lora_down.weight", torch.nn.Parameter(torch.zeros(2))),
        ("a.lora_up.weight", torch.nn.Parameter(torch.zeros(2))),
    ]
    groups = optim.lora_param_groups(named, 1e-4, 16.0)
    assert [g["lr"] for g in groups] == [1e-4, 1.6e-3] and groups[1]["params"][0] is named[1][1]
    opt = optim.build_optimizer(groups, optim.OptimizerConfig("AdamW", 1e-4))
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1.6e-3]
    adafactor = optim.OptimizerConfig("Adafactor", 1e-4, {"relative_step": True})
    with pytest.raises(UserError, match="LoRA\\+ .* needs a fixed learning rate"):
        optim.build_optimizer(groups, adafactor)


# ---- timesteps and loss weights -------------------------------------------------------------------------------------


def _musubi_forward(mode: str, n: int, hw: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """musubi's forward formulas (randn / rand draws), written independently of the quantile functions."""
    h, w = hw
    patches = (h // 2) * (w // 2)
    lines = {"flux_shift": (256, 0.5, 4096, 1.15, patches), "flux2_shift": (256, 0.5, 4096, 1.15, h * w),
             "qwen_shift": (256, 0.5, 8192, 0.9, patches), "krea2_shift": (256, 0.5, 6400, 1.15, patches)}  # fmt: skip
    z = torch.randn(n, generator=g, dtype=torch.float64)
    if mode == "ideogram4_shift":
        mean = 0.5 * math.log(16 * h * 16 * w / 512**2)
        return torch.sigmoid(mean + 1.5 * z).clamp(1 / (1 + math.exp(7.5)), 1 - 1 / (1 + math.exp(9)))
    x1, y1, x2, y2, x = lines[{"qinglong_flux": "flux_shift", "qinglong_qwen": "qwen_shift"}.get(mode, mode)]
    shift = math.exp(y1 + (y2 - y1) / (x2 - x1) * (x - x1))
    t = torch.sigmoid(z)
    t = shift * t / (1 + (shift - 1) * t)
    if mode.startswith("qinglong"):
        pick = torch.rand(n, generator=g, dtype=torch.float64)
        z2 = torch.randn(n, generator=g, dtype=torch.float64)
        logsnr, logsnr2 = torch.sigmoid(-z2 / 2), torch.sigmoid(-(5.36 + z2) / 2)
        mid = 0.79 if mode == "qinglong_flux" else 0.95
        t = torch.where(pick < mid, t, torch.where(pick < 0.9, logsnr, logsnr2) if mode == "qinglong_flux" else logsnr2)
    return t


@pytest.mark.parametrize("mode", flow.RESOLUTION_MODES)
def test_resolution_modes_match_musubi_formulas(mode):
    hw = (48, 80)
    t = flow.sample_timesteps(flow.TimestepConfig(mode=mode), 20000, torch.Generator().manual_seed(1), latent_hw=hw)
    ref = _musubi_forward(mode, 200_000, hw, torch.Generator().manual_seed(2))
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(float(torch.quantile(t.double(), q) - torch.quantile(ref, q))) < 0.02, q
    with pytest.raises(ValueError, match="depends on the latent size"):
        flow.sample_timesteps(flow.TimestepConfig(mode=mode), 4)


def test_mixture_is_conditioned_on_the_range():
    cfg = flow.TimestepConfig(mode="qinglong_flux", min_timestep=600, max_timestep=1000)
    t = flow.sample_timesteps(cfg, 20000, torch.Generator().manual_seed(3), latent_hw=(64, 64))
    ref = _musubi_forward("qinglong_flux", 400_000, (64, 64), torch.Generator().manual_seed(4))
    ref = ref[ref >= 0.6]
    assert float(t.min()) >= 0.6 and abs(float(t.double().median() - ref.median())) < 0.01


def test_loss_weights_and_weighted_mse():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    sigma_sqrt = flow.loss_weight(flow.TimestepConfig(weighting_scheme="sigma_sqrt"), t)
    torch.testing.assert_close(sigma_sqrt, torch.tensor([1e6, 16.0, 4.0, 1.0]))
    cosmap = flow.loss_weight(flow.TimestepConfig(weighting_scheme="cosmap"), t)
    torch.testing.assert_close(cosmap, 2 / (math.pi * (1 - 2 * t.clamp_min(1e-3) + 2 * t.clamp_min(1e-3) ** 2)))
    assert flow.loss_weight(flow.TimestepConfig(weighting_scheme="logit_normal"), t) is None
    pred, target = torch.randn(2, 3, 2, 2, 4), torch.randn(2, 3, 2, 2, 4)
    w = torch.tensor([2.0, 0.5])
    ref = (((pred - target) ** 2).mean(dim=(1, 2, 3, 4)) * w).mean()
    torch.testing.assert_close(masked_mse(pred, target, None, w), ref)
    frames = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    ref = (((pred - target) ** 2)[:, 1:].mean(dim=(1, 2, 3, 4)) * w).mean()
    torch.testing.assert_close(masked_mse(pred, target, frames, w), ref)
    # the sigma mode with a loss-weighting scheme draws uniformly, as musubi
    u = flow.sample_timesteps(flow.TimestepConfig(mode="sigma", weighting_scheme="cosmap"), 20000,
                              torch.Generator().manual_seed(0))  # fmt: skip
    assert abs(float(u.mean()) - 0.5) < 0.01


def test_max_norm_regularisation():
    from networks.lora import LoRAModule

    lora = LoRAModule("x", 8, 6, rank=2, alpha=1.0)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    norm = float((lora.lora_up.weight @ lora.lora_down.weight).detach().norm()) * lora.scale
    stats = max_norm_(torch.nn.ModuleList([lora]), norm / 2)
    assert stats.keys_scaled == 1 and stats.max_norm == pytest.approx(norm / 2)
    after = float((lora.lora_up.weight @ lora.lora_down.weight).detach().norm()) * lora.scale
    assert after == pytest.approx(norm / 2, rel=1e-5)
    assert max_norm_(torch.nn.ModuleList([lora]), norm).keys_scaled == 0


# ---- epochs, rotation ------------------------------------------------------------------------------------------------


def test_epochs_win_over_steps_and_rotation_windows():
    from kandinsky5.train.config import SaveConfig, TrainConfig

    cfg = TrainConfig.__new__(TrainConfig)
    object.__setattr__(cfg, "max_train_steps", 100)
    object.__setattr__(cfg, "max_train_epochs", 2)
    assert cfg.total_steps(7) == 14  # musubi: epochs win
    object.__setattr__(cfg, "max_train_epochs", None)
    assert cfg.total_steps(7) == 100
    save = SaveConfig("out", "lora", every_n_steps=10, last_n_steps=30, last_n_epochs=2, last_n_steps_state=10)
    assert save.kept("step", False) == 4  # steps 20, 30, 40, 50 at step 50 (musubi keeps the last 30 steps)
    assert save.kept("step", True) == 2 and save.kept("epoch", True) == 2
    assert dataclasses.replace(save, last_n_epochs_state=1).kept("epoch", True) == 1


# ---- end to end ------------------------------------------------------------------------------------------------------


def test_musubi_flags_end_to_end(tiny_bundle, toy, tmp_path, caplog):  # noqa: F811
    out = tmp_path / "out"
    flags = [
        "--max_train_steps", "4", "--save_every_n_steps", "1", "--save_last_n_steps", "2", "--save_state",
        "--save_last_n_steps_state", "1", "--timestep_sampling", "qinglong_flux", "--weighting_scheme", "cosmap",
        "--network_args", "loraplus_lr_ratio=4", "--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "25%",
        "--lr_decay_steps", "0.5", "--scale_weight_norms", "1.0", "--preserve_distribution_shape",
        "--block_swap_h2d_only", "--vae_dtype", "bf16",
    ]  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert train(base_args(tiny_bundle, toy, out, steps=4) + flags) == 0
    names = sorted(p.name for p in out.iterdir() if p.name != "logs")  # logs: the TensorBoard run folder
    assert names == ["lora-state", "lora-step00000001.safetensors", "lora-step00000002-state",
                     "lora-step00000002.safetensors", "lora-step00000003-state", "lora-step00000003.safetensors",
                     "lora.safetensors"]  # fmt: skip
    line = next(r.getMessage() for r in caplog.records if "differ from musubi-tuner's defaults" in r.getMessage())
    assert "timestep_sampling qinglong_flux (musubi: sigma)" in line and "learning_rate 0.001 (musubi: 2e-06)" in line
    assert "mixed_precision" not in line  # --mixed_precision no is musubi's default too
    assert "LoRA+: lora_up weights learn at 4" in caplog.text


def test_state_on_train_end_alone(tiny_bundle, toy, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert train(base_args(tiny_bundle, toy, out, steps=1) + ["--save_state_on_train_end"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name != "logs") == ["lora-state", "lora.safetensors"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--network_args", "include_patterns=['nope.*']"], "LoRA pattern 'nope.*' matches no Linear module"),
        (["--network_args", "loraplus_lr_ratio=-1"], "loraplus_lr_ratio must be a positive number"),
        (["--lr_scheduler", "cosine", "--lr_scheduler_args", "bogus=1"], "unexpected keyword argument 'bogus'"),
        (["--optimizer_args", "betas=3"], "--optimizer_args do not fit AdamW"),
        (["--mixed_precision", "fp16"], "--mixed_precision fp16 is not offered: Kandinsky 5 is a bf16 model"),
        (["--split_attn"], "--split_attn \\(a musubi-tuner flag\\) is not offered here"),
    ],
)
def test_bad_settings_fail_before_the_dit_loads(tiny_bundle, toy, tmp_path, capsys, extra, message):  # noqa: F811
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")  # loading it would fail with another message
    argv = base_args(tiny_bundle, toy, tmp_path / "out") + extra
    argv[argv.index("--dit") + 1] = str(broken)
    assert train(argv) == 1
    err = capsys.readouterr().err
    assert pytest.importorskip("re").search(message, err), err
    assert err.count("\n") == 1


def test_show_timesteps_console_and_png(tmp_path, capsys):
    assert train(["--show_timesteps", "console", "--task", "k5-tiny-t2v", "--timestep_sampling", "flux_shift",
                  "--weighting_scheme", "sigma_sqrt"]) == 0  # fmt: skip
    text = capsys.readouterr().out.splitlines()
    assert text[0].startswith("sampled timesteps (1000 t), 100000 draws") and len(text) == 82
    assert text[1].startswith("   0-  24: ") and text[41].startswith("loss weighting: max")
    assert train(["--show_timesteps", "image", "--output_dir", str(tmp_path), "--min_timestep", "100"]) == 0
    png = tmp_path / "timesteps_timesteps.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_video_dataset_without_enable_bucket_warns_once_per_dataset(tmp_path, caplog):
    from dataset.config import load_dataset_config

    (tmp_path / "v").mkdir()
    (tmp_path / "w").mkdir()
    cfg = tmp_path / "d.toml"
    head = '[general]\nresolution = 64\ncaption_extension = ".txt"\n'
    cfg.write_text(f'{head}[[datasets]]\nvideo_directory = "{tmp_path / "v"}"\n'
                   f'[[datasets]]\nvideo_directory = "{tmp_path / "w"}"\nenable_bucket = false\n')  # fmt: skip
    with caplog.at_level(logging.WARNING):
        load_dataset_config(cfg)
    assert caplog.text.count("enable_bucket is not set") == 1 and "datasets[0]: enable_bucket" in caplog.text


def test_cuda_switches_are_applied():
    from kandinsky5.train.args import apply_cuda_switches

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        apply_cuda_switches(True, True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = before


def test_bad_musubi_toml_sample_prompts_fail_before_training(tiny_bundle, toy, tmp_path, capsys):  # noqa: F811
    prompts = tmp_path / "prompts.toml"
    prompts.write_text('[prompt]\nsample_steps = 2\n\n[[prompt.subset]]\nprompt = "a cat"\nsample_stepz = 3\n')
    encoders = ["--text_encoder_qwen", str(tiny_bundle / "text_encoder"), "--text_encoder_clip",
                str(tiny_bundle / "text_encoder2"), "--vae", str(tiny_bundle / "vae")]  # fmt: skip
    extra = ["--sample_prompts", str(prompts), "--sample_every_n_steps", "1"]
    assert train(base_args(tiny_bundle, toy, tmp_path / "out") + encoders + extra) == 1
    err = capsys.readouterr().err
    assert f"error: --sample_prompts {prompts}:6: unknown key 'sample_stepz'" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_resume_refuses_to_switch_loraplus(tiny_bundle, toy, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert train(base_args(tiny_bundle, toy, out, steps=1) + ["--save_state"]) == 0
    again = base_args(tiny_bundle, toy, out, steps=2) + ["--resume", str(out / "lora-state")]
    assert train(again + ["--network_args", "loraplus_lr_ratio=4"]) == 1
    assert "saved with LoRA+ (--network_args loraplus_lr_ratio) off, this run asks for on" in capsys.readouterr().err
