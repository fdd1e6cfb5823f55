"""kandinsky5_train_network.py end to end on the tiny bundle: the seed's accelerate command as written, --help,
saved files and metadata, sampling during training, I2V, and the documented errors (config key, cache, NaN)."""

from __future__ import annotations

import os
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_training import write_toy_cache

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "kandinsky5_train_network.py"

# The training command of the seed document, verbatim (docs/training.md shows the same command).
SEED_COMMAND = r"""
accelerate launch --num_cpu_threads_per_process 1 --mixed_precision bf16 \
    kandinsky5_train_network.py \
    --mixed_precision bf16 \
    --dataset_config path/to/dataset.toml \
    --task k5-pro-t2v-5s-sd \
    --dit path/to/kandinsky5pro_t2v_pretrain_5s.safetensors \
    --text_encoder_qwen Qwen/Qwen2.5-VL-7B-Instruct \
    --text_encoder_clip openai/clip-vit-large-patch14 \
    --vae path/to/vae/diffusion_pytorch_model.safetensors \
    --fp8_base \
    --sdpa \
    --gradient_checkpointing \
    --max_data_loader_n_workers 1 \
    --persistent_data_loader_workers \
    --learning_rate 1e-4 \
    --optimizer_type AdamW8Bit \
    --optimizer_args "weight_decay=0.001" "betas=(0.9,0.95)" \
    --max_grad_norm 1.0 \
    --lr_scheduler constant_with_warmup \
    --lr_warmup_steps 100 \
    --network_module networks.lora_kandinsky \
    --network_dim 32 \
    --network_alpha 32 \
    --timestep_sampling shift \
    --discrete_flow_shift 5.0 \
    --output_dir path/to/output \
    --output_name k5_lora \
    --save_every_n_epochs 1 \
    --max_train_epochs 50 \
    --scheduler_scale 10.0
"""


def train(argv: list[str]) -> int:
    """Run the script's main in this process (as ``python kandinsky5_train_network.py ARGV`` would)."""
    from kandinsky5.cli import run_main

    return run_main(runpy.run_path(str(SCRIPT), run_name="k5_train")["main"], argv)


def base_args(bundle: Path, toml: Path, out: Path, task: str = "k5-tiny-t2v", steps: int = 2) -> list[str]:
    model = bundle / "model" / ("k5_tiny_i2v.safetensors" if "i2v" in task else "k5_tiny_t2v.safetensors")
    return [
        "--task", task, "--dit", str(model), "--dataset_config", str(toml), "--output_dir", str(out),
        "--output_name", "lora", "--mixed_precision", "no", "--max_train_steps", str(steps), "--seed", "3",
        "--max_data_loader_n_workers", "0", "--learning_rate", "1e-3",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_bundle) -> Path:
    """Toy caches that claim the tiny bundle's VAE (the trainer compares it with --vae, given for sampling)."""
    from kandinsky5.model.vae import vae_file_identity

    return write_toy_cache(tmp_path_factory.mktemp("toy"), n_items=4, vae=vae_file_identity(tiny_bundle / "vae"))


def test_seed_accelerate_command_runs_as_written(tiny_bundle, toy, tmp_path):
    subs = {
        "path/to/dataset.toml": str(toy),
        "k5-pro-t2v-5s-sd": "k5-tiny-t2v",
        "path/to/kandinsky5pro_t2v_pretrain_5s.safetensors": str(tiny_bundle / "model" / "k5_tiny_t2v.safetensors"),
        "Qwen/Qwen2.5-VL-7B-Instruct": str(tiny_bundle / "text_encoder"),
        "openai/clip-vit-large-patch14": str(tiny_bundle / "text_encoder2"),
        "path/to/vae/diffusion_pytorch_model.safetensors": str(tiny_bundle / "vae/diffusion_pytorch_model.safetensors"),
        "path/to/output": str(tmp_path / "out"),
        "--max_train_epochs 50": "--max_train_epochs 2",
    }  # fmt: skip
    command = SEED_COMMAND.replace("\\\n", " ")
    for old, new in subs.items():
        assert old in command
        command = command.replace(old, new)
    argv = shlex.split(command)
    argv[0] = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from networks.lora_kandinsky import load_lora_state_dict

    out = tmp_path / "out"
    assert (out / "k5_lora-000001.safetensors").is_file()  # --save_every_n_epochs 1 (epoch 2 = the final file)
    sd, meta = load_lora_state_dict(out / "k5_lora.safetensors")
    assert meta["k5_task"] == "k5-tiny-t2v" and meta["k5_scheduler_scale"] == "10.0"
    assert meta["ss_network_dim"] == "32" and meta["ss_network_alpha"] == "32.0"
    assert meta["ss_fp8_base"] == "True" and meta["ss_gradient_checkpointing"] == "True"
    assert "AdamW8bit" in meta["ss_optimizer"] and "betas=(0.9, 0.95)" in meta["ss_optimizer"]
    assert meta["ss_steps"] == "4" and meta["ss_epoch"] == "2"
    assert '"shift": 5.0' in meta["k5_timestep"]
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))
    # the default key format is the one diffusers, ComfyUI (K5 rule) and the official repo all load
    from safetensors import safe_open

    with safe_open(str(out / "k5_lora.safetensors"), "pt") as f:
        raw = list(f.keys())
    assert raw and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in raw)


def test_help_and_docs_document_every_flag():
    parser = runpy.run_path(str(SCRIPT), run_name="k5_train")["build_parser"]()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert all(a.help and a.help.strip() for a in flags), [a.dest for a in flags if not a.help]
    names = {s for a in flags for s in a.option_strings}
    seed_flags = {t for t in shlex.split(SEED_COMMAND.replace("\\\n", " ")) if t.startswith("--")}
    seed_flags -= {"--num_cpu_threads_per_process"}  # accelerate's own
    issue_flags = {
        "--max_train_steps", "--save_every_n_steps", "--save_last_n_epochs", "--save_last_n_steps", "--save_state",
        "--resume", "--seed", "--gradient_accumulation_steps", "--network_weights", "--network_dropout",
        "--network_args", "--sample_prompts", "--sample_every_n_steps", "--sample_every_n_epochs", "--sample_at_first",
        "--logging_dir", "--log_with", "--config_file", "--i2v_mode", "--save_format", "--min_timestep",
        "--max_timestep", "--sigmoid_scale", "--logit_mean", "--logit_std", "--lr_scheduler_num_cycles",
        "--lr_scheduler_power", "--blocks_to_swap", "--gradient_checkpointing_cpu_offload", "--force_nabla_attention",
        "--offload_dit_during_sampling", "--flash_attn",
    }  # fmt: skip
    assert seed_flags | issue_flags <= names, (seed_flags | issue_flags) - names
    doc = (ROOT / "docs" / "training.md").read_text()
    assert not [n for n in names if n.startswith("--") and f"`{n}" not in doc and f"{n} " not in doc]
    help_text = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert help_text.returncode == 0 and "--optimizer_args" in help_text.stdout


def test_config_file_tensorboard_and_saved_file_formats(tiny_bundle, toy, tmp_path):
    from networks.lora_kandinsky import create_network_from_weights, load_lora_state_dict

    config = tmp_path / "run.toml"
    config.write_text('[optimizer]\noptimizer_type = "adamw"\noptimizer_args = ["weight_decay=0.01"]\n'
                      'save_format = "diffusers"\n[network]\nnetwork_dim = 8\nnetwork_alpha = 4\n')  # fmt: skip
    out, logs = tmp_path / "out", tmp_path / "logs"
    tracker = ["--logging_dir", str(logs), "--log_with", "tensorboard"]
    assert train(base_args(tiny_bundle, toy, out) + ["--config_file", str(config)] + tracker) == 0
    events = list(logs.glob("lora_*/events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    sd, meta = load_lora_state_dict(out / "lora.safetensors")
    assert meta["k5_format"] == "diffusers" and meta["ss_network_dim"] == "8"
    assert meta["k5_base_checkpoint_hash"] and meta["ss_steps"] == "2"
    from kandinsky5.configs import get_task
    from kandinsky5.model.dit import DiT

    network = create_network_from_weights(1.0, sd, DiT(get_task("k5-tiny-t2v").dit), metadata=meta)
    assert len(network) == 46

    bad = tmp_path / "bad.toml"
    bad.write_text("network_dimm = 8\n")
    with pytest.raises(SystemExit):  # argparse is not involved: our UserError -> exit status 1
        raise SystemExit(train(base_args(tiny_bundle, toy, out) + ["--config_file", str(bad)]))


def test_documented_errors(tiny_bundle, toy, tmp_path, capsys):
    out = tmp_path / "out"
    bad = tmp_path / "bad.toml"
    bad.write_text("network_dimm = 8\n")
    cases = [
        (["--config_file", str(bad)], "unknown key 'network_dimm'.*did you mean network_dim"),
        (["--i2v_mode", "first_last"], "--i2v_mode applies to I2V tasks"),
        (["--sage_attn"], "--sage_attn has no backward"),
        (["--validate_every_n_steps", "2"], "need validation items: give --validation_split"),
        (["--sample_prompts", "p.txt"], "needs --text_encoder_qwen"),
        (["--timestep_sampling", "shift", "--min_timestep", "900", "--max_timestep", "100"], "min_timestep"),
        (["--save_every_n_steps", "0"], "--save_every_n_steps must be >= 1"),
        (["--learning_rate", "-1"], "--learning_rate must be a positive number"),
        (["--network_alpha", "-3"], "--network_alpha must be >= 0"),
        (["--network_dropout", "1.5"], r"--network_dropout must be in \[0, 1\)"),
        (["--max_grad_norm", "-1"], "--max_grad_norm must be >= 0"),
        (["--lr_scheduler", "polynomial", "--lr_scheduler_power", "-1"], "--lr_scheduler_power must be > 0"),
        (["--lr_scheduler_num_cycles", "0"], "--lr_scheduler_num_cycles must be >= 1"),
        (["--timestep_sampling", "sigma", "--weighting_scheme", "mode", "--mode_scale", "3"], "mode_scale"),
        (["--optimizer_type", "adamx"], "unknown --optimizer_type 'adamx'"),
        (["--lr_scheduler", "cosine_restarts"], "unknown --lr_scheduler 'cosine_restarts'"),
        (["--network_args", "include_patterns=['nothing_matches']"], "matches no Linear module"),
    ]
    for extra, message in cases:
        assert train(base_args(tiny_bundle, toy, out) + extra) == 1
        assert pytest.importorskip("re").search(message, capsys.readouterr().err), message
    wrong_task = base_args(tiny_bundle, toy, out, task="k5-lite-t2v-5s-sd")
    assert train(wrong_task) == 1
    assert "kandinsky5_cache_text_encoder_outputs.py" in capsys.readouterr().err  # 64-wide text cache vs Lite


def test_bad_sample_prompt_file_fails_before_training(tiny_bundle, toy, tmp_path, capsys):
    """Sample prompts are parsed and checked at start-up: no step runs and nothing is written."""
    encoders = ["--text_encoder_qwen", str(tiny_bundle / "text_encoder"), "--text_encoder_clip",
                str(tiny_bundle / "text_encoder2"), "--vae", str(tiny_bundle / "vae")]  # fmt: skip
    prompts = tmp_path / "prompts.txt"
    cases = [
        ("a cat --zz 1", f"{prompts}:1: unknown option --zz"),
        ("a cat --f 8", r"--frames must be 4k\+1"),
        (None, f"--sample_prompts {tmp_path / 'missing.txt'} does not exist"),
    ]
    for line, message in cases:
        out = tmp_path / "out"
        path = prompts if line is not None else tmp_path / "missing.txt"
        if line is not None:
            prompts.write_text(line + "\n")
        extra = ["--sample_prompts", str(path), "--sample_every_n_steps", "1"]
        assert train(base_args(tiny_bundle, toy, out) + encoders + extra) == 1
        err = capsys.readouterr().err
        assert pytest.importorskip("re").search(message, err), err
        assert "training:" not in err and not out.exists()


def test_nan_stops_with_the_last_good_checkpoint_untouched(tiny_bundle, toy, tmp_path, capsys):
    """A huge learning rate (deterministic, no flag needed) makes the step-2 loss NaN: the run stops with the
    documented message, writes nothing at step 2, and the step-1 file holds exactly the 1-step weights."""
    from safetensors.torch import load_file

    out, ref = tmp_path / "out", tmp_path / "ref"
    args = ["--learning_rate", "1e30", "--save_every_n_steps", "1"]
    assert train(base_args(tiny_bundle, toy, out, steps=6) + args) == 1
    err = capsys.readouterr().err
    first = out / "lora-step00000001.safetensors"
    assert f"at step 2; last good checkpoint: {first}; lower --learning_rate" in err, err
    assert "loss became nan" in err or "loss became inf" in err, err
    assert sorted(p.name for p in out.iterdir() if p.name != "logs") == ["lora-step00000001.safetensors"]
    assert train(base_args(tiny_bundle, toy, ref, steps=1) + args) == 0
    good, one_step = load_file(first), load_file(ref / "lora.safetensors")
    assert all(bool((good[k] == one_step[k]).all()) and bool(good[k].isfinite().all()) for k in good)


def test_sampling_during_training_writes_videos_and_leaves_training_unchanged(tiny_bundle, toy, tmp_path):
    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# one video, one image\nA red square slides. --w 64 --h 64 --f 5 --s 2 --g 3 --d 7\n"
                       "A cat. --w 64 --h 48 --f 1 --s 1 --g 1\n")  # fmt: skip
    sampling = [
        "--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--sample_at_first",
        "--text_encoder_qwen", str(tiny_bundle / "text_encoder"), "--text_encoder_clip",
        str(tiny_bundle / "text_encoder2"), "--vae", str(tiny_bundle / "vae" / "diffusion_pytorch_model.safetensors"),
        "--network_dropout", "0.2",
    ]  # fmt: skip
    with_samples, without = tmp_path / "a", tmp_path / "b"
    assert train(base_args(tiny_bundle, toy, with_samples, steps=4) + sampling) == 0
    assert train(base_args(tiny_bundle, toy, without, steps=4) + ["--network_dropout", "0.2"]) == 0
    names = sorted(p.name for p in (with_samples / "sample").iterdir())
    assert names == [f"lora_{s:06d}_{i}" for s in (0, 2, 4) for i in ("00_7.mp4", "01_42.png", "sheet.png")]
    from kandinsky5.sampling.video_io import read_video

    frames, fps, meta = read_video(with_samples / "sample" / "lora_000004_00_7.mp4")
    assert frames.shape == (5, 64, 64, 3) and meta["training_step"] == "4"
    a, b = load_file(with_samples / "lora.safetensors"), load_file(without / "lora.safetensors")
    assert all(bool((a[k] == b[k]).all()) for k in a)  # sampling restored every RNG: same training trajectory


def test_i2v_first_last_training_runs_and_records_the_mode(tiny_bundle, toy, tmp_path):
    from networks.lora_kandinsky import load_lora_state_dict

    out = tmp_path / "out"
    args = base_args(tiny_bundle, toy, out, task="k5-tiny-i2v") + ["--i2v_mode", "first_last", "--save_format",
                                                                    "musubi"]  # fmt: skip
    assert train(args) == 0
    _, meta = load_lora_state_dict(out / "lora.safetensors")
    assert meta["k5_i2v_mode"] == "first_last" and meta["k5_format"] == "musubi"


def test_nabla_geometry_is_checked_before_the_dit_loads(tiny_bundle, tmp_path, capsys, caplog):
    toml = write_toy_cache(tmp_path / "odd", n_items=2, size=12)  # latent 12x12 -> 96 px: not a multiple of 128
    with caplog.at_level("INFO"):
        assert train(base_args(tiny_bundle, toml, tmp_path / "out") + ["--force_nabla_attention"]) == 1
    assert "multiples of 128" in capsys.readouterr().err
    assert "loaded DiT" not in caplog.text
