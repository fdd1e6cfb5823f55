"""``kandinsky5_generate_video.py`` end to end on the tiny bundle (CPU, fp32 unless the seed command says otherwise).

Sizes are small (128x128 or image-driven ~128x128, 9 frames, 2 steps) so the whole file runs in well under a minute.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from kandinsky5.cli import run_main
from kandinsky5.configs import TINY_DIT
from kandinsky5.sampling.video_io import read_image, read_video
from tests.helpers import load_module

ROOT = Path(__file__).resolve().parents[1]


main = load_module(ROOT / "kandinsky5_generate_video.py", "kandinsky5_generate_video").main

SMALL = ["--frames", "9", "--steps", "2", "--width", "128", "--height", "128"]

# docs/seed-kandinsky5.md "Inference", verbatim
SEED_COMMAND = """python kandinsky5_generate_video.py \
    --task k5-pro-t2v-5s-sd \
    --dit path/to/kandinsky5pro_t2v_pretrain_5s.safetensors \
    --vae path/to/vae/diffusion_pytorch_model.safetensors \
    --text_encoder_qwen Qwen/Qwen2.5-VL-7B-Instruct \
    --text_encoder_clip openai/clip-vit-large-patch14 \
    --offload_dit_during_sampling \
    --fp8_base \
    --dtype bfloat16 \
    --prompt "A cat walks on the grass, realistic style." \
    --negative_prompt "low quality, artifacts" \
    --frames 17 \
    --steps 50 \
    --guidance 5 \
    --scheduler_scale 10 \
    --seed 42 \
    --width 512 \
    --height 512 \
    --output path/to/output.mp4 \
    --lora_weight path/to/lora.safetensors \
    --lora_multiplier 1.0"""


def _models(bundle, task="k5-tiny-t2v") -> list[str]:
    ckpt = "k5_tiny_i2v" if "i2v" in task else "k5_tiny_t2v"
    return [
        "--task", task,
        "--dit", str(bundle / "model" / f"{ckpt}.safetensors"),
        "--vae", str(bundle / "vae"),
        "--text_encoder_qwen", str(bundle / "text_encoder"),
        "--text_encoder_clip", str(bundle / "text_encoder2"),
    ]  # fmt: skip


def _run(bundle, *args, task="k5-tiny-t2v", dtype="float32") -> int:
    argv = [*_models(bundle, task), "--dtype", dtype, "--device", "cpu", *map(str, args)]
    return run_main(main, argv)


def _latents(path) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("latents")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    for name in ("first", "last"):
        Image.fromarray((rng.rand(120, 160, 3) * 255).astype(np.uint8)).save(root / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A rank-4 LoRA for the tiny DiT with non-zero up weights (so it changes the output)."""
    from kandinsky5.model.dit import DiT
    from networks.lora_kandinsky import create_network, save_lora

    net = create_network(1.0, 4, 4, DiT(TINY_DIT))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, module in net.items():
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * 0.05)
    path = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    save_lora(path, net)
    return path


def test_t2v_writes_mp4_and_same_seed_gives_same_video(tiny_bundle, tmp_path):
    for name in ("a", "b"):
        rc = _run(tiny_bundle, "--prompt", "a red ball", *SMALL, "--output", tmp_path / f"{name}.mp4",
                  "--save_latents", tmp_path / f"{name}.safetensors")  # fmt: skip
        assert rc == 0
    frames, fps, meta = read_video(tmp_path / "a.mp4")
    assert frames.shape == (9, 128, 128, 3) and fps == 24
    assert meta["prompt"] == "a red ball" and meta["seed"] == "42" and meta["task"] == "k5-tiny-t2v"
    assert meta["negative_prompt"].startswith("Static, 2D cartoon")
    assert torch.equal(_latents(tmp_path / "a.safetensors"), _latents(tmp_path / "b.safetensors"))
    assert np.array_equal(frames, read_video(tmp_path / "b.mp4")[0])


def test_i2v_first_and_first_last(tiny_bundle, images, tmp_path):
    first, last = images / "first.png", images / "last.png"
    common = ["--prompt", "a ball rolls", "--frames", "9", "--steps", "2"]
    assert _run(tiny_bundle, *common, "--i", first, "--output", tmp_path / "f.mp4", task="k5-tiny-i2v") == 0
    frames, _, meta = read_video(tmp_path / "f.mp4")
    assert frames.shape == (9, 112, 144, 3)  # size follows the 160x120 image at ~128*128 area, /16
    assert meta["image"] == str(first)
    rc = _run(tiny_bundle, *common, "--image", first, "--image_last", last, "--width", 128, "--height", 96,
              "--output", tmp_path / "fl.mp4", task="k5-tiny-i2v")  # fmt: skip
    assert rc == 0
    frames, _, meta = read_video(tmp_path / "fl.mp4")
    assert frames.shape == (9, 96, 128, 3) and meta["image_last"] == str(last)


def test_prompt_file_single_frame_png_and_latent_round_trip(tiny_bundle, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# samples\na red ball --w 64 --h 64 --f 5 --d 3\n\na blue cube --f 1 --s 1 --g 1.0\n")
    rc = _run(tiny_bundle, "--prompt_file", prompts, "--steps", 2, "--output", tmp_path / "s.mp4",
              "--save_latents", tmp_path / "s.safetensors", "--offload_dit_during_sampling")  # fmt: skip
    assert rc == 0
    frames, _, meta = read_video(tmp_path / "s_000.mp4")
    assert frames.shape == (5, 64, 64, 3) and meta["seed"] == "3"
    image, meta = read_image(tmp_path / "s_001.png")
    assert image.shape == (128, 128, 3) and meta["prompt"] == "a blue cube" and meta["guidance"] == "1.0"
    rc = run_main(main, ["--decode_latents", str(tmp_path / "s_000.safetensors"), "--vae", str(tiny_bundle / "vae"),
                         "--dtype", "float32", "--device", "cpu", "--output", str(tmp_path / "d.mp4")])  # fmt: skip
    assert rc == 0
    decoded, _, decoded_meta = read_video(tmp_path / "d.mp4")
    assert np.array_equal(decoded, frames) and decoded_meta["prompt"] == "a red ball"


def test_lora_zero_multiplier_is_identity_and_merge_equals_runtime(tiny_bundle, lora_file, tmp_path):
    def latents(name, *lora):
        out = tmp_path / f"{name}.safetensors"
        assert _run(tiny_bundle, "--prompt", "a red ball", *SMALL, "--save_latents", out, *lora) == 0
        return _latents(out)

    base = latents("base")
    zero = latents("zero", "--lora_weight", lora_file, "--lora_multiplier", 0.0)
    merged = latents("merged", "--lora_weight", lora_file, "--lora_multiplier", 1.0)
    runtime = latents("runtime", "--lora_weight", lora_file, "--lora_multiplier", 1.0, "--lora_mode", "runtime")
    assert torch.equal(base, zero)
    assert (merged - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(runtime, merged, rtol=1e-4, atol=1e-4 * merged.abs().max().item())


def _other_architecture_lora(path):
    from safetensors.torch import save_file

    save_file({
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.zeros(4, 3072),
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.zeros(9216, 4),
        "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(4.0),
    }, str(path))  # fmt: skip
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("frames", "--frames must be 4k+1 video frames (1, 5, 9, ..., 121); got 10, nearest valid: 9, 13"),
        ("no_image", "task k5-tiny-i2v is image-to-video: pass an input image with --image (--i)"),
        ("missing_image", "does not exist"),
        ("task", "unknown task 'k5-nope'"),
        ("lora", "k5-tiny-t2v: first unmatched key 'diffusion_model.double_blocks.0.img_attn.qkv.lora_"),
        ("exists", "already exists; pass --overwrite to replace it"),
    ],
)
def test_bad_inputs_give_one_line_errors(tiny_bundle, tmp_path, capsys, case, message):
    out = tmp_path / "o.mp4"
    args, task = ["--prompt", "x", *SMALL, "--output", out], "k5-tiny-t2v"
    if case == "frames":
        args[args.index("9")] = "10"
    elif case in ("no_image", "missing_image"):
        task = "k5-tiny-i2v"
        args += ["--image", tmp_path / "nope.png"] if case == "missing_image" else []
    elif case == "task":
        task = "k5-nope"
    elif case == "lora":
        args += ["--lora_weight", _other_architecture_lora(tmp_path / "flux.safetensors")]
    elif case == "exists":
        out.write_bytes(b"keep me")
    assert _run(tiny_bundle, *args, task=task) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    if case == "exists":
        assert out.read_bytes() == b"keep me"


def test_seed_inference_command_runs_as_written(tiny_bundle, lora_file, tmp_path):
    """The seed's command with paths/task swapped for the tiny bundle; like tests/test_docs_commands.py, the
    compute knobs --steps 50 / --width 512 / --height 512 become 2 / 128 / 128 (50 steps at 512x512 take minutes
    on a CPU).  Every flag, --fp8_base, bf16 and DiT offloading included, runs as written."""
    subs = [
        ("path/to/kandinsky5pro_t2v_pretrain_5s.safetensors", str(tiny_bundle / "model" / "k5_tiny_t2v.safetensors")),
        ("path/to/vae/diffusion_pytorch_model.safetensors",
         str(tiny_bundle / "vae" / "diffusion_pytorch_model.safetensors")),
        ("Qwen/Qwen2.5-VL-7B-Instruct", str(tiny_bundle / "text_encoder")),
        ("openai/clip-vit-large-patch14", str(tiny_bundle / "text_encoder2")),
        ("path/to/output.mp4", str(tmp_path / "output.mp4")),
        ("path/to/lora.safetensors", str(lora_file)),
        ("k5-pro-t2v-5s-sd", "k5-tiny-t2v"),
        ("--steps 50", "--steps 2"),
        ("--width 512", "--width 128"),
        ("--height 512", "--height 128"),
    ]  # fmt: skip
    command = SEED_COMMAND
    for old, new in subs:
        command = command.replace(old, new)
    argv = shlex.split(command)[2:]
    assert run_main(main, argv) == 0
    frames, fps, meta = read_video(tmp_path / "output.mp4")
    assert frames.shape == (17, 128, 128, 3) and fps == 24
    assert meta["negative_prompt"] == "low quality, artifacts" and meta["scheduler_scale"] == "10.0"
    assert meta["loras"] == '{"lora.safetensors": 1.0}'


def test_lora_trained_with_other_settings_warns(tiny_bundle, tmp_path, caplog):
    from kandinsky5.model.dit import DiT
    from networks.lora_kandinsky import create_network, save_lora

    path = tmp_path / "i2v_lora.safetensors"
    save_lora(path, create_network(1.0, 4, 4, DiT(TINY_DIT)), {"k5_task": "k5-tiny-i2v", "k5_scheduler_scale": "7.5"})
    with caplog.at_level("WARNING"):
        assert _run(tiny_bundle, "--prompt", "a red ball", *SMALL, "--save_latents", tmp_path / "x.safetensors",
                    "--lora_weight", path) == 0  # fmt: skip
    text = caplog.text
    assert "trained on k5-tiny-i2v (I2V) and is used with k5-tiny-t2v (T2V)" in text
    assert "trained with --scheduler_scale 7.5; sampling uses 5.0" in text


def test_adapters_are_fitted_before_the_dit_loads_and_runtime_loha_is_planned(tiny_bundle, tmp_path, capsys, caplog):
    """A LoRA of other shapes fails before any weight loads (a weightless DiT checks every key), and a runtime
    LoHa's ΔW working set enters the start-up memory plan (merge mode forms no ΔW while sampling)."""
    from kandinsky5.model.dit import DiT
    from networks import loha_kandinsky
    from networks.lora_kandinsky import create_network, save_lora

    wide = dataclasses.replace(TINY_DIT, model_dim=2 * TINY_DIT.model_dim, ff_dim=2 * TINY_DIT.ff_dim)
    other = tmp_path / "wide.safetensors"
    save_lora(other, create_network(1.0, 4, 4, DiT(wide)))
    with caplog.at_level("INFO"):
        assert _run(tiny_bundle, "--prompt", "x", *SMALL, "--output", tmp_path / "o.mp4", "--lora_weight", other) == 1
    assert "does not fit the DiT of task k5-tiny-t2v" in capsys.readouterr().err
    assert "loaded DiT" not in caplog.text
    loha = loha_kandinsky.create_network(1.0, 4, 4.0, DiT(TINY_DIT))
    path = tmp_path / "loha.safetensors"
    loha_kandinsky.save_lora(path, loha)
    seen = []
    script = main.__globals__  # the generator module's namespace
    real = script["check_generation_memory"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(script, "check_generation_memory", lambda *a, **k: seen.append(k) or real(*a, **k))
        for mode in ("merge", "runtime"):
            args = ["--prompt", "x", *SMALL, "--output", tmp_path / f"{mode}.mp4", "--lora_weight", path]
            assert _run(tiny_bundle, *args, "--lora_mode", mode) == 0
    largest = max(m.in_features * m.out_features for m in loha.lora_modules)
    assert seen[0]["adapter_work"] == {} and seen[1]["adapter_work"] == {"delta_forward": 12 * largest}
