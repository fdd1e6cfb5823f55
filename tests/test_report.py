"""What a run shows: contact sheet and loss.png geometry, TensorBoard tags and images, the resumed run folder, the
end summary, trackers (wandb optional), and the console (log lines never inside a bar, errors on their own line,
third-party noise silenced without hiding other warnings)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kandinsky5.common import UserError
from kandinsky5.train.insight import report
from kandinsky5.train.insight.tracker import TrackerConfig, new_run_folder, sanitized_config

ROOT = Path(__file__).resolve().parents[1]
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR)")


def _solid(frames: int, h: int, w: int, colour) -> np.ndarray:
    out = np.zeros((frames, h, w, 3), dtype=np.uint8)
    out[...] = colour
    return out


def test_contact_sheet_rows_are_prompts_and_columns_frames(tmp_path):
    video = _solid(17, 64, 64, (200, 0, 0))
    video[-1] = (0, 0, 200)  # the last frame is blue: it must be the last column
    rows = [report.SheetRow("#0  step 5  seed 7  a red square", video),
            report.SheetRow("#1  step 5  seed 42  a cat", _solid(1, 64, 96, (0, 200, 0)))]  # fmt: skip
    path = report.contact_sheet(rows, tmp_path / "sheet.png")
    sheet = np.asarray(Image.open(path).convert("RGB"))
    cell, label, cols = report.CELL_MIN, report.LABEL_HEIGHT, report.SHEET_COLUMNS  # 64 px frames scale up to 128
    assert sheet.shape == (2 * (label + cell), max(report.SHEET_MIN_WIDTH, cols * cell), 3)
    assert report.sheet_frame_indices(17) == [0, 2, 5, 7, 9, 11, 14, 16]
    centre = label + cell // 2
    assert tuple(sheet[centre, cell // 2]) == (200, 0, 0)
    assert tuple(sheet[centre, cols * cell - cell // 2]) == (0, 0, 200)
    second = 2 * label + cell + cell // 2
    assert tuple(sheet[second, 96]) == (0, 200, 0) and tuple(sheet[second, 192 + 10]) == (24, 24, 24)  # 96x64 -> 192
    assert sheet[: label - 2, :200].max() > 200  # the label text is drawn


def test_loss_png_and_frame_strip(tmp_path):
    steps = list(range(1, 41))
    loss = [1.0 / s + 0.1 * (s % 3) for s in steps]
    path = report.loss_plot(tmp_path / "loss.png", "demo", steps, loss, loss, [1e-4] * 40, [(0, 1.2), (40, 0.6)], 5)
    assert Image.open(path).size == (report.LOSS_FIGSIZE[0] * report.LOSS_DPI, report.LOSS_FIGSIZE[1] * report.LOSS_DPI)
    strip = report.frame_strip(_solid(9, 16, 24, (1, 2, 3)))
    assert strip.shape == (16, 72, 3) and report.frame_strip(_solid(1, 16, 24, 0)).shape == (16, 24, 3)
    assert report.format_duration(3725.4) == "1:02:05"


def test_tracker_flags(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(UserError, match="--log_with wandb needs the wandb package: pip install wandb"):
        TrackerConfig(log_with="wandb").check()
    bad = tmp_path / "trackers.toml"
    bad.write_text("[comet]\nx = 1\n")
    with pytest.raises(UserError, match="unknown entry 'comet'"):
        TrackerConfig(tracker_config=bad).check()
    assert TrackerConfig(log_with="all").backends == ("tensorboard", "wandb") and not TrackerConfig("none").backends
    flags = sanitized_config({"dit": "/secret/path", "wandb_api_key": "k", "network_dim": 4, "x": [1]})
    assert flags == {"network_dim": 4, "x": "[1]"}
    first = new_run_folder(TrackerConfig(log_prefix="p-"), tmp_path, "lora")
    assert first.parent == tmp_path / "logs" and first.name.startswith("p-")
    first.mkdir(parents=True)
    assert new_run_folder(TrackerConfig(log_prefix="p-"), tmp_path, "lora") != first  # never an existing folder


def _event_tags(folder: Path) -> tuple[dict, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc.Tags(), [e.step for e in acc.Scalars("loss/current")]


def test_tensorboard_tags_sheet_summary_and_resumed_run_folder(tiny_bundle, tmp_path, caplog):
    from kandinsky5.model.vae import vae_file_identity
    from tests.test_train_cli import base_args, train
    from tests.test_training import write_toy_cache

    vae = tiny_bundle / "vae" / "diffusion_pytorch_model.safetensors"
    toml = write_toy_cache(tmp_path / "data", n_items=5, batch_size=1, vae=vae_file_identity(vae))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A red square slides. --w 32 --h 32 --f 5 --s 1 --g 1 --d 7\n")
    out = tmp_path / "out"
    args = base_args(tiny_bundle, toml, out, steps=4) + [
        "--validation_split", "0.3", "--validate_every_n_steps", "2", "--validation_timesteps", "0.1,0.9",
        "--save_every_n_steps", "2", "--save_state",
        "--sample_prompts", str(prompts), "--sample_every_n_steps", "4", "--text_encoder_qwen",
        str(tiny_bundle / "text_encoder"), "--text_encoder_clip", str(tiny_bundle / "text_encoder2"), "--vae",
        str(vae),
    ]  # fmt: skip
    with caplog.at_level("INFO"):
        assert train(args) == 0
    (folder,) = (out / "logs").iterdir()
    tags, steps = _event_tags(folder)
    wanted = {"loss/current", "loss/average", "loss/epoch", "loss/validation", "loss/validation/t0.1",
              "loss/validation/t0.9", "lr", "grad_norm", "steps_per_sec"}  # fmt: skip
    assert wanted <= set(tags["scalars"]) and tags["images"] == ["samples/00"] and steps == [1, 2, 3, 4]
    sheet = Image.open(out / "sample" / "lora_000004_sheet.png")
    assert sheet.size == (5 * report.CELL_MIN, report.LABEL_HEIGHT + report.CELL_MIN)  # 1 prompt, 5 frames
    assert Image.open(folder / "loss.png").size == (900, 500)
    summary = caplog.text[caplog.text.index("training finished") :]
    paths = re.findall(re.escape(str(tmp_path)) + r"\S*", summary)
    assert len(paths) >= 6 and all(Path(p.rstrip(")")).exists() for p in paths), paths
    assert "best checkpoint" in summary and f"tensorboard --logdir {out / 'logs'}" in summary
    # resume at step 2 in the same output dir: the same run folder goes on, the crashed tail is purged
    caplog.clear()
    with caplog.at_level("INFO"):
        assert train(args + ["--resume", str(out / "lora-step00000002-state")]) == 0
    assert "continuing the run folder" in caplog.text
    assert list((out / "logs").iterdir()) == [folder] and len(list(folder.glob("events.out.tfevents.*"))) == 2
    assert _event_tags(folder)[1] == [1, 2, 3, 4]  # steps 3-4 of the first run are hidden by purge_step


def test_wandb_offline_logs_the_same_run(tiny_bundle, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tests.test_train_cli import base_args, train
    from tests.test_training import write_toy_cache

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    toml = write_toy_cache(tmp_path / "data", n_items=2)
    out = tmp_path / "out"
    args = ["--log_with", "all", "--log_tracker_name", "k5-test", "--wandb_run_name", "r1", "--log_config"]
    assert train(base_args(tiny_bundle, toml, out, steps=1) + args) == 0
    (folder,) = (out / "logs").iterdir()
    runs = list((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert list((folder / "k5-test").glob("events.out.tfevents.*"))  # TensorBoard under the tracker name


# ----------------------------------------------------------------------------------------------------------------
# console
# ----------------------------------------------------------------------------------------------------------------


def _segments(text: str) -> list[str]:
    return [s for s in re.split(r"[\r\n]", text) if s.strip()]


def assert_clean_console(text: str) -> None:
    """No traceback, no bitsandbytes CPU-kernel warning, and every log line starts a line of its own."""
    assert "Traceback" not in text and "gemm_4bit_forward" not in text
    glued = [s for s in _segments(text) if TIMESTAMP.search(s) and not TIMESTAMP.match(s)]
    assert not glued, glued[:3]


def test_log_lines_go_around_an_open_bar(capsys):
    from tqdm import tqdm

    from kandinsky5.common import LOG_FORMAT, TqdmHandler

    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger("k5.test.bar")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with tqdm(total=3, desc="training", file=sys.stderr) as bar:
            bar.update(1)
            logger.warning("saved something")
            bar.update(1)
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert_clean_console(err)
    assert any(TIMESTAMP.match(s) and s.endswith("saved something") for s in _segments(err))


def test_third_party_noise_is_dropped_and_other_warnings_stay(caplog):
    from kandinsky5.common import configure_logging, quiet_hf_progress

    configure_logging()
    source = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level("WARNING"):
        source.warning("Failed to load CPU gemm_4bit_forward from kernels-community: x. Please pip install kernels")
        source.warning("some other bitsandbytes warning")
    assert "gemm_4bit" not in caplog.text and "some other bitsandbytes warning" in caplog.text
    quiet_hf_progress()
    from transformers.utils.logging import tqdm as hf_tqdm

    loading, download = hf_tqdm(range(2), desc="Loading weights"), hf_tqdm(range(2), desc="model.safetensors")
    assert loading.disable and not download.disable
    download.close()


def test_a_failing_run_prints_its_error_after_the_bar_and_nothing_inside_it(tiny_bundle, tmp_path):
    """Subprocess (the scripts' own logging setup): saves and validation log while the bar is open, then a NaN
    stops the run: every log line has a line of its own, the error is the last line, no traceback, no noise."""
    from tests.test_train_cli import base_args
    from tests.test_training import write_toy_cache

    toml = write_toy_cache(tmp_path / "data", n_items=4, batch_size=1)
    args = base_args(tiny_bundle, toml, tmp_path / "out", steps=6) + [
        "--learning_rate", "1e30", "--save_every_n_steps", "1", "--validation_split", "0.3",
        "--validate_every_n_steps", "1", "--validation_timesteps", "0.5",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "kandinsky5_train_network.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1
    assert_clean_console(proc.stderr)
    segments = _segments(proc.stderr)
    assert segments[-1].startswith("error: loss became") and "training:" in proc.stderr, segments[-3:]
    assert any(TIMESTAMP.match(s) and "saved" in s for s in segments)
