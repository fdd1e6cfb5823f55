"""Bad input and faults of the two cachers, the generator and the LoRA converter, plus temp-file leftovers,
rotation and file modes (issue 12).  Same three checks as ``test_faults.py`` (whose helpers this file uses): exit
status, one ``error:`` line without a traceback, pre-existing files byte-identical.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky5.common import run_cli
from tests.helpers import load_module
from tests.test_faults import Usage, _damage, assert_unchanged, enospc, no_leftovers, one_line, snapshot, tmpfs

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------
# 8. leftovers, rotation, file modes
# ------------------------------------------------------------------------------------------------------------


def test_orphaned_temp_files_of_this_tool_are_removed_and_nothing_else(tmp_path, caplog):
    from kandinsky5.files import remove_orphans

    dead = 2**22 + 12345  # above the default pid_max: no such process
    ours = [f".lora.safetensors.ab3d5f7h.{dead}.tmp", f".lora-step00000008-state.tmp-{dead}",
            f".lora-step00000002-state.del-{dead}", f".lora-state.old-{dead}"]  # fmt: skip
    kept = [".lora.safetensors.ab3d5f7h.1.tmp", ".hidden_notes", "lora.safetensors.ab3d5f7h.99.tmp", "lora-state",
            f".lora.safetensors.{dead}.tmp"]  # fmt: skip
    for name in ours + kept:
        (tmp_path / name).mkdir() if "state" in name else (tmp_path / name).write_bytes(b"x")
    (tmp_path / f".lora-step00000004-state.old-{dead}").mkdir()  # its real name is missing: restored, not deleted
    with caplog.at_level("INFO"):
        removed = remove_orphans(tmp_path)
    assert sorted(p.name for p in removed) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "lora-step00000004-state"])
    assert "removed 4 leftover temporary file(s)" in caplog.text and "restored" in caplog.text


def test_rotation_renames_a_state_folder_before_deleting_it(tmp_path, monkeypatch):
    from kandinsky5.train import state

    for step in (1, 2):
        (tmp_path / f"lora-step{step:08d}-state").mkdir()
        (tmp_path / f"lora-step{step:08d}-state" / "progress.json").write_text("{}")
    seen = []
    monkeypatch.setattr(state.shutil, "rmtree", lambda p, *a, **k: seen.append(Path(p).name) or enospc())
    with pytest.raises(OSError):
        state.rotate(tmp_path, r"lora-step(\d+)(?:\.safetensors|-state)", keep=1, current=2)
    assert seen == [f".lora-step00000001-state.del-{os.getpid()}"]  # deleted only under the hidden name
    assert not (tmp_path / "lora-step00000001-state").exists() and (tmp_path / "lora-step00000002-state").exists()


def test_every_final_file_type_gets_0644_under_umask_022(tiny_bundle, tmp_path):
    from dataset.cache import write_latent_cache, write_text_cache
    from kandinsky5.files import save_safetensors, save_torch, write_text
    from kandinsky5.sampling.video_io import write_image, write_video
    from kandinsky5.tiny_weights import _save_dit
    from kandinsky5.train.state import write_state_dir
    from networks.lora_kandinsky import main as convert_main
    from tests.test_cache_format import LATENT_META, TEXT_META

    old = os.umask(0o022)
    try:
        lat = tmp_path / "a_k5.safetensors"
        write_latent_cache(lat, torch.zeros(1, 2, 2, 16), torch.zeros(2, 2, 2, 16), LATENT_META)
        write_text_cache(tmp_path / "a_k5_te.safetensors", torch.zeros(3, 4), torch.zeros(2), TEXT_META)
        save_safetensors({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
        write_state_dir(
            tmp_path / "s-state", {"a.pt": lambda p: save_torch({}, p), "b.json": lambda p: write_text(p, "{}")}
        )
        _save_dit(tmp_path / "dit.safetensors", "k5-tiny-t2v", 0)
        frames = np.zeros((5, 16, 16, 3), np.uint8)
        write_video(tmp_path / "v.mp4", frames)
        write_image(tmp_path / "i.png", frames[0])
        lora = tmp_path / "lora.safetensors"
        _tiny_lora(lora)
        assert convert_main(["convert", str(lora), str(tmp_path / "conv.safetensors"), "--format", "musubi"]) == 0
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 10
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


def _tiny_lora(path: Path) -> Path:
    from kandinsky5.configs import TINY_DIT
    from kandinsky5.model.dit import DiT
    from networks.lora_kandinsky import create_network, save_lora

    save_lora(path, create_network(1.0, 4, 4, DiT(TINY_DIT)))
    return path


# ------------------------------------------------------------------------------------------------------------
# the two cachers
# ------------------------------------------------------------------------------------------------------------


def _image_dataset(root: Path) -> Path:
    media = root / "media"
    media.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name in ("a", "b"):
        Image.fromarray((rng.rand(32, 32, 3) * 255).astype(np.uint8)).save(media / f"{name}.png")
        (media / f"{name}.txt").write_text(f"picture {name}")
    toml = root / "d.toml"
    toml.write_text(f'[[datasets]]\nimage_directory = "{media}"\ncache_directory = "{root / "cache"}"\n'
                    'resolution = 32\ncaption_extension = ".txt"\n')  # fmt: skip
    return toml


@pytest.mark.parametrize("stage", ["latents", "text"])
def test_cachers_disk_full_and_bad_dirs_and_files(tiny_bundle, tmp_path, capsys, monkeypatch, stage):
    import safetensors.torch

    name = "kandinsky5_cache_latents.py" if stage == "latents" else "kandinsky5_cache_text_encoder_outputs.py"
    script = load_module(ROOT / name, f"_faults_{stage}_cacher")
    toml = _image_dataset(tmp_path / "data")
    if stage == "latents":
        models = ["--vae", str(tiny_bundle / "vae" / "diffusion_pytorch_model.safetensors"), "--num_workers", "0"]
    else:
        models = ["--text_encoder_qwen", str(tiny_bundle / "text_encoder"), "--text_encoder_clip",
                  str(tiny_bundle / "text_encoder2")]  # fmt: skip
    argv = ["--dataset_config", str(toml), *models, "--device", "cpu"]
    assert run_cli(script.main, argv) == 0
    capsys.readouterr()
    before = snapshot(tmp_path)
    with monkeypatch.context() as m:  # disk full while writing: one line, the caches written before are intact
        m.setattr(safetensors.torch, "save_file", enospc)
        assert run_cli(script.main, argv) == 1
    one_line(capsys.readouterr().err, "no space left on device", "--skip_existing")
    assert_unchanged(before)
    no_leftovers(tmp_path)
    # a file in the way of the cache directory: found before the model loads
    blocked = toml.read_text().replace(str(tmp_path / "data" / "cache"), str(toml))
    (tmp_path / "blocked.toml").write_text(blocked)
    monkeypatch.setattr(script, "VideoVAE" if stage == "latents" else "TextEncoder", None)  # loading would fail
    assert run_cli(script.main, ["--dataset_config", str(tmp_path / "blocked.toml"), *models]) == 1
    one_line(capsys.readouterr().err, "datasets[0].cache_directory", "cannot be used")
    assert_unchanged(before)


def test_cacher_model_files_damaged(tiny_bundle, tmp_path, capsys):
    latents = load_module(ROOT / "kandinsky5_cache_latents.py", "_faults_latents_cacher2")
    text = load_module(ROOT / "kandinsky5_cache_text_encoder_outputs.py", "_faults_text_cacher2")
    toml = _image_dataset(tmp_path / "data")
    vae = _damage(tiny_bundle / "vae" / "diffusion_pytorch_model.safetensors", tmp_path / "vae.safetensors",
                  "truncated")  # fmt: skip
    assert run_cli(latents.main, ["--dataset_config", str(toml), "--vae", str(vae), "--device", "cpu"]) == 1
    one_line(capsys.readouterr().err, f"--vae {vae} is not a complete .safetensors file")
    qwen = tmp_path / "qwen"
    shutil.copytree(tiny_bundle / "text_encoder", qwen)
    shard = next(qwen.glob("*.safetensors"))
    _damage(shard, shard, "truncated")
    argv = ["--dataset_config", str(toml), "--text_encoder_qwen", str(qwen), "--text_encoder_clip",
            str(tiny_bundle / "text_encoder2"), "--device", "cpu"]  # fmt: skip
    assert run_cli(text.main, argv) == 1
    one_line(capsys.readouterr().err, f"{shard} is not a complete .safetensors file")


# ------------------------------------------------------------------------------------------------------------
# the generator
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator():
    return load_module(ROOT / "kandinsky5_generate_video.py", "_faults_generate")


def _gen_args(bundle: Path, *extra) -> list[str]:
    return ["--task", "k5-tiny-t2v", "--dit", str(bundle / "model" / "k5_tiny_t2v.safetensors"), "--vae",
            str(bundle / "vae"), "--text_encoder_qwen", str(bundle / "text_encoder"), "--text_encoder_clip",
            str(bundle / "text_encoder2"), "--dtype", "float32", "--device", "cpu", "--prompt", "a cat", "--frames",
            "1", "--steps", "1", "--width", "64", "--height", "64", *map(str, extra)]  # fmt: skip


def test_generator_disk_full_at_the_end_keeps_existing_files(tiny_bundle, tmp_path, capsys, monkeypatch, generator):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.png").write_bytes(b"an earlier picture")
    before = snapshot(tmp_path)
    monkeypatch.setattr(Image.Image, "save", enospc)
    assert run_cli(generator.main, _gen_args(tiny_bundle, "--output", out / "x.png", "--overwrite")) == 1
    one_line(capsys.readouterr().err, f"cannot write output {out / 'x.png'}: no space left on device",
             "the existing file was kept")  # fmt: skip
    assert_unchanged(before)
    no_leftovers(tmp_path)


@pytest.mark.parametrize("case", ["dir_is_a_file", "lora", "decode_latents", "no_space", "read_only"])
def test_generator_checks_before_any_model_loads(tiny_bundle, tmp_path, capsys, monkeypatch, generator, case):
    monkeypatch.setattr(generator, "Kandinsky5Pipeline", None)  # any model load would fail
    (tmp_path / "blocker").write_bytes(b"x")
    out, extra = tmp_path / "o.png", []
    with contextlib.ExitStack() as stack:
        if case == "dir_is_a_file":
            out, needle = tmp_path / "blocker" / "o.png", "output directory"
        elif case == "lora":
            extra = ["--lora_weight", _damage(tiny_bundle / "vae" / "config.json", tmp_path / "l.safetensors", "text")]
            needle = "--lora_weight"
        elif case == "decode_latents":
            extra = ["--decode_latents", _damage(tmp_path / "blocker", tmp_path / "lat.safetensors", "pickle")]
            needle = "--decode_latents"
        elif case == "no_space":
            monkeypatch.setattr("kandinsky5.preflight.shutil.disk_usage", lambda p: Usage(10**6, 10**6, 1000))
            needle = "free on its disk"
        else:
            out = stack.enter_context(tmpfs(tmp_path / "ro", "ro,size=1m")) / "o.png"
            needle = "read-only file system"
        before = snapshot(tmp_path)
        assert run_cli(generator.main, _gen_args(tiny_bundle, "--output", out, *extra)) == 1
        one_line(capsys.readouterr().err, needle)
        assert_unchanged(before)


# ------------------------------------------------------------------------------------------------------------
# the LoRA converter
# ------------------------------------------------------------------------------------------------------------


def test_converter_faults(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    from networks.lora_kandinsky import main as convert

    lora = _tiny_lora(tmp_path / "lora.safetensors")
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"keep me")
    before = snapshot(tmp_path)
    cases = [
        ([str(tmp_path / "missing.safetensors"), str(tmp_path / "new.safetensors")], "input", "does not exist"),
        ([str(lora), str(dst)], "output", "already exists; pass --overwrite"),
        ([str(_damage(lora, tmp_path / "cut.safetensors", "truncated")), str(tmp_path / "n.safetensors")], "input",
         "is not a complete .safetensors file"),
    ]  # fmt: skip
    before[tmp_path / "cut.safetensors"] = (tmp_path / "cut.safetensors").read_bytes()
    for argv, first, needle in cases:
        assert run_cli(convert, ["convert", *argv]) == 1
        one_line(capsys.readouterr().err, first, needle)
    monkeypatch.setattr(safetensors.torch, "save_file", enospc)
    assert run_cli(convert, ["convert", str(lora), str(dst), "--overwrite"]) == 1
    one_line(capsys.readouterr().err, "no space left on device", "the existing file was kept")
    assert_unchanged(before)
    no_leftovers(tmp_path)
