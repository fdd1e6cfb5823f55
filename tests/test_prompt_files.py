"""Prompt files in musubi-tuner's .toml / .json formats and the text format: musubi's keys and meanings, errors that
name ``file:line``, the keys whose meaning differs from musubi's (``--l``, ``--f``) and the frames log line."""

from __future__ import annotations

import logging

import pytest

from kandinsky5.common import UserError
from kandinsky5.configs import get_task
from kandinsky5.sampling.pipeline import request_from_line
from kandinsky5.sampling.prompts import describe_frames, parse_prompt_line, read_prompt_file

TOML = """\
# musubi sample prompts
[prompt]
width = 64
height = 64
sample_steps = 2
frame_count = 5
negative_prompt = "blurry"

[[prompt.subset]]
prompt = "a cat walks"
seed = 1

[[prompt.subset]]
prompt = "a dog runs"
guidance_scale = 4
frame_count = 9
w = 128
"""

JSON = """\
[
  "a red ball --W 64 --h 64 --F 5 --ei last.png --i first.png",
  {
    "prompt": "a blue cube",
    "sample_steps": 3,
    "seed": 7,
    "image_path": "cube.png",
    "end_image_path": "cube_end.png"
  }
]
"""


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_musubi_toml_merges_subsets_over_prompt_defaults(tmp_path):
    path = _write(tmp_path, "prompts.toml", TOML)
    first, second = read_prompt_file(path)
    assert first.prompt == "a cat walks" and first.source == f"{path}:9"
    assert first.overrides() == dict(width=64, height=64, frames=5, seed=1, steps=2, negative_prompt="blurry")
    assert second.overrides() == dict(width=128, height=64, frames=9, steps=2, guidance=4.0, negative_prompt="blurry")
    assert second.source == f"{path}:13"


def test_musubi_json_objects_and_lines(tmp_path):
    path = _write(tmp_path, "prompts.json", JSON)
    line, obj = read_prompt_file(path)
    assert line.prompt == "a red ball" and line.source == f"{path}:2"
    assert line.overrides() == dict(width=64, height=64, frames=5, image="first.png", image_last="last.png")
    assert obj.prompt == "a blue cube" and obj.source == f"{path}:3"
    assert obj.overrides() == dict(steps=3, seed=7, image="cube.png", image_last="cube_end.png")


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("p.toml", TOML.replace("seed = 1", "seed = one"), ":11: not valid TOML"),
        ("p.toml", TOML.replace("w = 128", "wdth = 128"), ":17: unknown key 'wdth'; valid keys: prompt, width"),
        ("p.toml", TOML.replace("seed = 1", 'seed = "1"'), ":11: seed must be an integer, got '1'"),
        ("p.toml", TOML.replace("width = 64", 'width = "64"'), ":3: width must be an integer"),
        ("p.toml", TOML.replace('prompt = "a dog runs"\n', ""), ":13: the entry has no prompt"),
        ("p.toml", "[prompt]\nwidth = 64\n", ":1: \\[prompt\\] needs at least one \\[\\[prompt.subset\\]\\] entry"),
        ("p.toml", 'prompt = "x"\n', ":1: a musubi prompt file has one \\[prompt\\] table"),
        ("p.json", JSON.replace('"seed": 7,', '"seed": 7'), ":7: not valid JSON"),
        ("p.json", JSON.replace('"seed": 7', '"sead": 7'), ":6: unknown key 'sead'"),
        ("p.json", JSON.replace("--F 5", "--q 5"), ":2: unknown option --q"),
        ("p.json", "[1, 2]", ":1: a list item must be a prompt object or a prompt line"),
        ("p.json", '{"prompt": "x"}', ":1: a musubi prompt JSON is a non-empty list"),
        ("p.txt", "a cat --w 64\na dog --l 7.5\n", ":2: --l 7.5: here --l is the last-frame image; in musubi --l is "
                                                   "cfg_scale.*For CFG write --g 7.5"),
        ("p.txt", "a cat --w wide\n", ":1: --w expects int, got 'wide'"),
    ],
)  # fmt: skip
def test_malformed_files_name_file_and_line(tmp_path, name, text, message):
    path = _write(tmp_path, name, text)
    with pytest.raises(UserError, match=message) as caught:
        read_prompt_file(path)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


def test_request_errors_name_the_line_and_musubi_latent_frames(tmp_path):
    task = get_task("k5-tiny-t2v")
    path = _write(tmp_path, "p.toml", TOML.replace("frame_count = 9", "frame_count = 6"))
    lines = read_prompt_file(path)
    request_from_line(task, lines[0])
    with pytest.raises(UserError, match=rf"^{path}:13: --frames must be 4k\+1 .* its --f 6 is --f 21 here$"):
        request_from_line(task, lines[1])
    text = _write(tmp_path, "p.txt", "ok --f 5\nmissing image --i nope.png --w 64 --h 64\n")
    with pytest.raises(UserError, match=rf"^{text}:2: --image nope.png does not exist"):
        [request_from_line(task, line) for line in read_prompt_file(text)]


def test_frames_are_logged_as_video_and_latent_frames(tmp_path, caplog):
    assert describe_frames(17) == "17 video frames (5 latent)" and describe_frames(1) == "1 video frame (1 latent)"
    path = _write(tmp_path, "p.txt", "a cat --f 17 --w 64 --h 64\n")
    with caplog.at_level(logging.INFO):
        request_from_line(get_task("k5-tiny-t2v"), read_prompt_file(path)[0])
    assert f"{path}:1: 17 video frames (5 latent), 64x64" in caplog.text
    assert "its --f 17 is --f 65 here" in caplog.text  # the musubi note, once per file


def test_ignored_musubi_keys_warn_and_keys_are_case_insensitive(caplog):
    with caplog.at_level(logging.WARNING):
        line = parse_prompt_line("x --W 64 --FS 3 --cn c.mp4 --S 4", where="p.txt:4")
    assert line.overrides() == dict(width=64, steps=4)
    assert "p.txt:4: option --fs is ignored" in caplog.text and "--scheduler_scale" in caplog.text
    assert "p.txt:4: option --cn is ignored" in caplog.text


def test_generator_reads_a_musubi_json_prompt_file(tiny_bundle, tmp_path, caplog):
    from kandinsky5.sampling.video_io import read_image
    from tests.test_generate_cli import _run

    prompts = _write(tmp_path, "p.json", '[{"prompt": "a blue cube", "frame_count": 1, "sample_steps": 1, '
                                         '"guidance_scale": 1.0, "seed": 5, "width": 64, "height": 64}]')  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert _run(tiny_bundle, "--prompt_file", prompts, "--output", tmp_path / "s.png") == 0
    image, meta = read_image(tmp_path / "s.png")
    assert image.shape == (64, 64, 3) and (meta["prompt"], meta["seed"], meta["steps"]) == ("a blue cube", "5", "1")
    assert f"{prompts}:1: 1 video frame (1 latent), 64x64, 1 steps" in caplog.text
