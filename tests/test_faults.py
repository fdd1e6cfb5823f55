"""Bad input and faults of the trainer (issue 12; the cachers, the generator and the converter are in
``test_faults_tools.py``, which shares the helpers below): every case checks the exit status,
ONE ``error:`` line on stderr (the last one, no ``Traceback``) and that every file that existed before is
byte-identical afterwards.  Checks that can run before a model loads are asserted to run before it (no "loaded
DiT" in the log).

Disk full is injected through the real writers patched to raise ``OSError(ENOSPC)`` on every machine, and with a
real small tmpfs where ``mount`` works (root); those tests skip cleanly elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from tests.helpers import load_module
from tests.test_train_cli import base_args, train
from tests.test_training import write_toy_cache

ROOT = Path(__file__).resolve().parents[1]
Usage = namedtuple("Usage", "total used free")


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------


def snapshot(*roots: Path) -> dict[Path, bytes]:
    """Every file under ``roots`` with its bytes."""
    return {p: p.read_bytes() for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()}


def assert_unchanged(before: dict[Path, bytes]) -> None:
    changed = [p for p, data in before.items() if not p.is_file() or p.read_bytes() != data]
    assert not changed, changed


def no_leftovers(*roots: Path) -> None:
    hidden = [p for root in roots for p in Path(root).rglob(".*")]
    assert not hidden, hidden


def one_line(err: str, *needles: str) -> str:
    """The single ``error:`` line, which must be the last line; no traceback anywhere."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert "Traceback" not in err, err[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A real tmpfs at ``path`` (root and a working ``mount`` only; otherwise the test is skipped)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount for a real tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def with_media(root: Path, n_items: int = 2, frames: int = 3) -> Path:
    """``write_toy_cache`` plus the (empty) media files and captions it was "made" from, so captions and the item
    list can be checked; the files are never decoded."""
    toml = write_toy_cache(root, n_items=n_items, frames=frames, batch_size=1)
    for i in range(n_items):
        (root / "videos" / f"clip_{i}.mp4").write_bytes(b"")
        (root / "videos" / f"clip_{i}.txt").write_text(f"caption {i}")
    return toml


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_toy_cache(tmp_path_factory.mktemp("faults_toy"), n_items=2, batch_size=1)


@pytest.fixture(scope="module")
def finished_run(tiny_bundle, toy, tmp_path_factory) -> Path:
    """An output dir of a 2-step run: lora-step00000001.safetensors (+ -state), lora.safetensors (+ -state)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    assert train(base_args(tiny_bundle, toy, out) + ["--save_every_n_steps", "1", "--save_state"]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    return out


# ------------------------------------------------------------------------------------------------------------
# 1. the trainer refuses to overwrite an earlier run
# ------------------------------------------------------------------------------------------------------------


def test_trainer_refuses_an_earlier_run_unless_resumed(tiny_bundle, toy, run_copy, tmp_path, capsys, caplog):
    before = snapshot(run_copy)
    with caplog.at_level("INFO"):
        assert train(base_args(tiny_bundle, toy, run_copy)) == 1
    one_line(capsys.readouterr().err, "already holds lora-state, lora-step00000001-state", "--overwrite", "--resume")
    assert "loaded DiT" not in caplog.text
    assert_unchanged(before)
    # step files of another run with the same name are refused the same way
    other = tmp_path / "other"
    other.mkdir()
    (other / "lora-step00000007.safetensors").write_bytes(b"someone else's")
    assert train(base_args(tiny_bundle, toy, other)) == 1
    one_line(capsys.readouterr().err, "lora-step00000007.safetensors")
    assert (other / "lora-step00000007.safetensors").read_bytes() == b"someone else's"
    # --resume of that run's own state continues it (and may replace its later files)
    state = run_copy / "lora-step00000001-state"
    assert train(base_args(tiny_bundle, toy, run_copy) + ["--save_state", "--resume", str(state)]) == 0
    assert (run_copy / "lora-step00000001.safetensors").read_bytes() == before[
        run_copy / "lora-step00000001.safetensors"
    ]


# ------------------------------------------------------------------------------------------------------------
# 2. preflight and disk full
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["file_in_the_way", "no_space", "logging_dir"])
def test_trainer_preflight_fails_before_the_dit_loads(tiny_bundle, toy, tmp_path, capsys, caplog, monkeypatch, case):
    out, extra = tmp_path / "out", []
    if case == "file_in_the_way":
        out.write_bytes(b"not a directory")
        needle = "--output_dir"
    elif case == "no_space":
        monkeypatch.setattr("kandinsky5.preflight.shutil.disk_usage", lambda p: Usage(10**6, 10**6, 1000))
        needle = "only 1.0 KB free on its disk, but this run writes about"
    else:
        (tmp_path / "logs").write_bytes(b"x")
        extra, needle = ["--logging_dir", str(tmp_path / "logs" / "sub"), "--log_with", "tensorboard"], "--logging_dir"
    before, listing = snapshot(tmp_path), sorted(p.name for p in tmp_path.iterdir())
    with caplog.at_level("INFO"):
        assert train(base_args(tiny_bundle, toy, out) + extra) == 1
    one_line(capsys.readouterr().err, needle)
    assert "loaded DiT" not in caplog.text
    assert_unchanged(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # directories made for the probe are gone


def test_trainer_disk_full_during_the_state_write_keeps_the_previous_pair(
    tiny_bundle, toy, run_copy, capsys, monkeypatch
):
    """The issue's case: the LoRA was written, the state write hits ENOSPC.  Neither replaces the old pair."""
    before = snapshot(run_copy)
    monkeypatch.setattr(torch, "save", enospc)
    args = base_args(tiny_bundle, toy, run_copy, steps=1) + ["--save_state", "--overwrite"]
    assert train(args) == 1
    one_line(capsys.readouterr().err, "cannot save lora.safetensors and lora-state", "no space left on device",
             "nothing was replaced")  # fmt: skip
    assert_unchanged(before)
    no_leftovers(run_copy)


def test_trainer_real_disk_full(tiny_bundle, toy, tmp_path, capsys, monkeypatch):
    """A real 64 KB tmpfs: refused at start-up.  A real 4 MB tmpfs filled after the first checkpoint: the run
    stops at the second save with one line naming the first, which is intact."""
    with tmpfs(tmp_path / "small", "size=64k") as small:
        assert train(base_args(tiny_bundle, toy, small / "out")) == 1
        one_line(capsys.readouterr().err, "free on its disk")
    from kandinsky5.train import run as run_module

    original = run_module._write_checkpoint
    calls = []

    def fill_then_write(run, path, state, rng, *gathered):  # gathered: the LoRA state and optimizer files
        calls.append(path)
        if len(calls) == 2:  # fill the disk between the first and the second save
            with open(path.parent / "filler", "wb", buffering=0) as fh, contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * (1 << 16))
        return original(run, path, state, rng, *gathered)

    monkeypatch.setattr(run_module, "_write_checkpoint", fill_then_write)
    monkeypatch.setattr("kandinsky5.train.startup.estimate_output_bytes", lambda *a: 0)  # the 16 MB headroom
    with tmpfs(tmp_path / "disk", "size=4m") as disk:
        out = disk / "out"
        assert train(base_args(tiny_bundle, toy, out) + ["--save_every_n_steps", "1", "--save_state"]) == 1
        first = out / "lora-step00000001-state"
        one_line(capsys.readouterr().err, "no space left on device", f"last good checkpoint: {first}")
        from safetensors.torch import load_file

        assert load_file(out / "lora-step00000001.safetensors") and (first / "progress.json").is_file()
        assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------------------
# 4. damaged files
# ------------------------------------------------------------------------------------------------------------


def _damage(src: Path, dst: Path, how: str) -> Path:
    data = src.read_bytes()
    if how == "truncated":
        dst.write_bytes(data[: len(data) // 2])
    elif how == "text":
        dst.write_text("<html>404 not found</html>" if dst.suffix == ".html" else "just some notes\n" * 10)
    elif how == "pickle":
        torch.save({"weight": torch.zeros(2)}, dst)
    elif how == "bogus_size":
        dst.write_bytes((2**62).to_bytes(8, "little") + data[8:])
    return dst


@pytest.mark.parametrize(
    "flag, how, needle",
    [
        ("--dit", "truncated", "is not a complete .safetensors file"),
        ("--dit", "text", "is a text file, not .safetensors"),
        ("--dit", "pickle", "is a PyTorch pickle"),
        ("--dit", "bogus_size", "is not a .safetensors file"),
        ("--network_weights", "truncated", "is not a complete .safetensors file"),
        ("cache", "truncated", "damaged or truncated latents cache"),
    ],
)
def test_trainer_damaged_files_are_one_line(tiny_bundle, tmp_path, capsys, caplog, flag, how, needle):
    toml = write_toy_cache(tmp_path / "data", n_items=2)
    args = base_args(tiny_bundle, toml, tmp_path / "out")
    if flag == "--dit":
        args[args.index("--dit") + 1] = str(_damage(tiny_bundle / "model" / "k5_tiny_t2v.safetensors",
                                                   tmp_path / "dit.safetensors", how))  # fmt: skip
    elif flag == "--network_weights":
        args += [flag, str(_damage(toml, tmp_path / "lora.safetensors", "text"))]
        needle = "is a text file"
    else:
        latent = next((tmp_path / "data" / "cache").glob("*_k5.safetensors"))
        _damage(latent, latent, how)
    before = snapshot(tmp_path)
    with caplog.at_level("INFO"):
        assert train(args) == 1
    one_line(capsys.readouterr().err, needle)
    assert "loaded DiT" not in caplog.text
    assert_unchanged(before)


# ------------------------------------------------------------------------------------------------------------
# 5. resume mismatches and damaged states
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, task, needle",
    [
        (["--network_dim", "8"], "k5-tiny-t2v", "was saved with --network_dim 4, this run asks for 8"),
        (["--network_alpha", "2"], "k5-tiny-t2v", "--network_alpha 1.0, this run asks for 2.0"),
        (["--optimizer_type", "Adafactor"], "k5-tiny-t2v", "torch.optim.adamw.AdamW, this run asks for transformers"),
        ([], "k5-tiny-i2v", "--task k5-tiny-t2v, this run asks for k5-tiny-i2v"),
        (["--mixed_precision", "bf16"], "k5-tiny-t2v", "--mixed_precision no, this run asks for bf16"),
        (["--network_args", "exclude_patterns=['.*feed_forward.*']"], "k5-tiny-t2v", "targets"),
        ("progress.json", "k5-tiny-t2v", "progress.json is not valid JSON"),
        ("optimizer.pt", "k5-tiny-t2v", "optimizer.pt is damaged or incomplete"),
        ("network.safetensors", "k5-tiny-t2v", "network.safetensors is not a complete .safetensors file"),
    ],
)
def test_resume_mismatch_is_one_line_before_loading(
    tiny_bundle, toy, finished_run, tmp_path, capsys, caplog, extra, task, needle
):
    state = tmp_path / "state"
    shutil.copytree(finished_run / "lora-step00000001-state", state)
    if isinstance(extra, str):  # a damaged state file
        _damage(state / extra, state / extra, "truncated" if extra != "progress.json" else "text")
        extra = []
    args = [*base_args(tiny_bundle, toy, tmp_path / "out", task=task), *extra, "--resume", str(state)]
    before = snapshot(tmp_path)
    with caplog.at_level("INFO"):
        assert train(args) == 1
    one_line(capsys.readouterr().err, f"--resume {state}", needle)
    assert "loaded DiT" not in caplog.text
    assert_unchanged(before)


# ------------------------------------------------------------------------------------------------------------
# 6. checkpoints that do not fit the task
# ------------------------------------------------------------------------------------------------------------


def test_checkpoint_of_another_family_warns_and_a_lora_of_other_shapes_fails(
    tiny_bundle, toy, finished_run, tmp_path, capsys, caplog, monkeypatch
):
    monkeypatch.setattr("kandinsky5.preflight.shutil.disk_usage", lambda p: Usage(10**6, 10**6, 1000))  # stop early
    args = base_args(tiny_bundle, toy, tmp_path / "a", task="k5-tiny-i2v")
    args[args.index("--dit") + 1] = str(tiny_bundle / "model" / "k5_tiny_t2v.safetensors")  # same shapes as i2v
    with caplog.at_level("INFO"):
        assert train(args) == 1
    assert "was made for k5-tiny-t2v (T2V) but is used with k5-tiny-i2v (I2V)" in caplog.text
    capsys.readouterr()
    lora = finished_run / "lora.safetensors"  # rank 4
    with caplog.at_level("INFO"):
        assert train(base_args(tiny_bundle, toy, tmp_path / "b") + ["--network_weights", str(lora),
                                                                   "--network_dim", "8"]) == 1  # fmt: skip
    one_line(capsys.readouterr().err, f"--network_weights {lora} does not fit this run's LoRA")
    assert "loaded DiT" not in caplog.text


# ------------------------------------------------------------------------------------------------------------
# 3. stale caches (and issue 11 item 9: the prompt template of 1-frame clips)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["caption", "resolution", "target_frames", "vae", "removed_item", "allowed"])
def test_stale_caches_are_refused_with_the_command_to_rerun(tiny_bundle, tmp_path, capsys, caplog, monkeypatch, change):
    toml = with_media(tmp_path / "data")
    text = toml.read_text()
    args = base_args(tiny_bundle, toml, tmp_path / "out")
    script, needle = "kandinsky5_cache_latents.py", ""
    if change in ("caption", "allowed"):
        (tmp_path / "data" / "videos" / "clip_1.txt").write_text("a different caption")
        script, needle = "kandinsky5_cache_text_encoder_outputs.py", "the caption changed (cache 'caption 1', now"
    elif change == "resolution":
        toml.write_text(text.replace("resolution = [128, 128]", "resolution = [256, 256]"))
        needle = "was cached at 128x128 but the TOML's resolution / enable_bucket / bucket_no_upscale now give 256x256"
    elif change == "target_frames":
        toml.write_text(text.replace("target_frames = [9]", "target_frames = [5]"))
        needle = "has 9 frames but target_frames is now [5]"
    elif change == "vae":
        args += ["--vae", str(tiny_bundle / "vae")]
        needle = "was encoded with VAE toy-vae, not the --vae given"
    elif change == "removed_item":
        (tmp_path / "data" / "videos" / "clip_1.mp4").unlink()
        needle = "belongs to 'clip_1.mp4', which is no longer in datasets[0]"
    if change == "allowed":
        args.append("--allow_stale_cache")
        monkeypatch.setattr("kandinsky5.preflight.shutil.disk_usage", lambda p: Usage(10**6, 10**6, 1000))
    before = snapshot(tmp_path)
    with caplog.at_level("INFO"):
        assert train(args) == 1
    err = capsys.readouterr().err
    if change == "allowed":  # passes the cache check with a warning (and stops at the disk check instead)
        assert "--allow_stale_cache: training on them anyway" in caplog.text and "the caption changed" in caplog.text
        one_line(err, "free on its disk")
    else:
        one_line(err, "stale cache: ", needle, f"re-run {script} --dataset_config {toml}", "--allow_stale_cache")
    assert "loaded DiT" not in caplog.text
    assert_unchanged(before)


def test_frame_windows_are_rederived_from_the_recorded_video_length(tmp_path):
    from dataset.cache import read_latent_cache, write_latent_cache
    from dataset.config import load_dataset_config
    from dataset.latent_dataset import discover_items
    from dataset.staleness import find_stale
    from kandinsky5.configs import get_task

    toml = with_media(tmp_path, n_items=1)  # one 9-frame clip
    latent = next((tmp_path / "cache").glob("*_k5.safetensors"))
    cache = read_latent_cache(latent)
    meta = {k: v for k, v in cache.meta.items() if k not in ("stage", "format_version", "json_keys", "dtype")}
    text = toml.read_text()

    def stale(frames, source_frames=17, settings="target_frames = [9]"):
        write_latent_cache(latent, cache.latents, cache.latents_image,
                           {**meta, "frame_indices": frames, "source_frames": source_frames})  # fmt: skip
        toml.write_text(text.replace("target_frames = [9]", settings))
        config = load_dataset_config(toml)
        return find_stale(config, discover_items(config, get_task("k5-tiny-t2v")))

    fresh = stale(list(range(9)))
    assert not fresh and not fresh.notes
    more = stale(list(range(9)), settings="target_frames = [5, 9]")
    assert not more and more.notes == ["datasets[0]: the frame settings cut 1 clip(s) that are not cached (new "
                                       "target_frames or extraction settings?); run kandinsky5_cache_latents.py "
                                       "--skip_existing to add them"]  # fmt: skip
    moved = stale(list(range(4, 13)))  # head extraction never cuts frames 4-12
    assert "holds frames 4-12, a clip the current frame settings" in moved.message(toml)
    slide = stale(list(range(4, 13)), settings='target_frames = [9]\nframe_extraction = "slide"\nframe_stride = 4')
    assert not slide and "cut 2 clip(s) that are not cached" in slide.notes[0]  # starts 0 and 8 are missing


def test_one_frame_clips_need_the_image_template(tmp_path):
    from dataset.config import load_dataset_config
    from dataset.latent_dataset import discover_items
    from kandinsky5.common import UserError
    from kandinsky5.configs import get_task, prompt_template
    from kandinsky5.sampling.pipeline import text_template

    assert all(prompt_template(f, get_task("k5-pro-t2v-5s-sd")) == text_template(f) for f in (1, 5, 121))
    toml = write_toy_cache(tmp_path, n_items=2, frames=1)  # 1-frame clips whose text caches have the video template
    with pytest.raises(
        UserError, match="holds the 'video' prompt template.*need 'image'.*re-run kandinsky5_cache_text"
    ):
        discover_items(load_dataset_config(toml), get_task("k5-tiny-t2v"))
    items = discover_items(load_dataset_config(write_toy_cache(tmp_path / "b", n_items=2, template="image",
                                                               frames=1)), get_task("k5-tiny-t2v"))  # fmt: skip
    assert {it.template for it in items} == {"image"}


def test_text_cacher_stores_both_templates_for_mixed_clip_lengths(tiny_bundle, tmp_path):
    from dataset.cache import read_text_cache, text_cache_path
    from kandinsky5.model.text_encoders import TextEncoder

    script = load_module(ROOT / "kandinsky5_cache_text_encoder_outputs.py", "_faults_text_script")
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "walk.mp4").write_bytes(b"")  # never decoded by the text cacher
    (videos / "walk.txt").write_text("a person walks")
    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\nvideo_directory = "{videos}"\ncache_directory = "{tmp_path / "cache"}"\n'
                    'resolution = 64\ncaption_extension = ".txt"\ntarget_frames = [1, 5]\n')  # fmt: skip
    encoders = ["--text_encoder_qwen", str(tiny_bundle / "text_encoder"), "--text_encoder_clip",
                str(tiny_bundle / "text_encoder2")]  # fmt: skip
    assert script.main(["--dataset_config", str(toml), *encoders, "--device", "cpu"]) == 0
    path = text_cache_path(tmp_path / "cache", "walk.mp4")
    encoder = TextEncoder.load(encoders[1], encoders[3], "cpu", "float32")
    for template in ("video", "image"):
        cache = read_text_cache(path, template=template)
        assert cache.meta["templates"] == ["video", "image"]
        embeds, pooled = encoder.encode(["a person walks"], template, 256).unpadded(0)
        torch.testing.assert_close(cache.embeds, embeds.to(cache.embeds.dtype), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.pooled, pooled.to(cache.pooled.dtype), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# --debug, and the real exit status / stderr of a process (direct and under accelerate launch --quiet)
# ------------------------------------------------------------------------------------------------------------


def test_debug_prints_the_traceback_then_the_line(tiny_bundle, toy, tmp_path, capsys):
    args = base_args(tiny_bundle, toy, tmp_path / "out")
    args[args.index("--dit") + 1] = str(tmp_path / "missing.safetensors")
    assert train(args + ["--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "UserError" in err
    assert err.strip().splitlines()[-1].startswith("error: DiT checkpoint not found")


def test_processes_end_with_our_line(tiny_bundle, toy, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = tmp_path / "dit.safetensors"
    bad.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    args = base_args(tiny_bundle, toy, tmp_path / "out")
    args[args.index("--dit") + 1] = str(bad)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launch = [accelerate, "launch", "--quiet", "--num_processes", "1", "--num_machines", "1", "--mixed_precision",
              "no", "--dynamo_backend", "no", "kandinsky5_train_network.py", *args]  # fmt: skip
    proc = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    one_line(proc.stderr, "is a Git LFS pointer, not the weights")
