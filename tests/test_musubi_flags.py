"""Every flag of musubi-tuner's four Kandinsky 5 scripts is ours or refused with one line (never argparse's bare
``unrecognized arguments`` / ``invalid choice``), and ``--help`` shows every default.

The flags come from ``tests/data/musubi_k5_flags.json``, generated once from musubi's parser definitions by
``scripts/musubi_flag_table.py`` (flag names, types, choices and defaults only; no musubi code).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from kandinsky5.cli import HelpFormatter, parse_args
from kandinsky5.common import UserError
from kandinsky5.musubi_compat import REFUSED
from tests.helpers import load_module

ROOT = Path(__file__).resolve().parents[1]
TABLE = json.loads((ROOT / "tests" / "data" / "musubi_k5_flags.json").read_text(encoding="utf-8"))

_SCRIPT_KEY = {
    "kandinsky5_train_network.py": "train",
    "kandinsky5_generate_video.py": "generate",
    "kandinsky5_cache_latents.py": "cache_latents",
    "kandinsky5_cache_text_encoder_outputs.py": "cache_text",
}
_PARSERS: dict[str, argparse.ArgumentParser] = {}


def _parser(script: str) -> argparse.ArgumentParser:
    if script not in _PARSERS:
        _PARSERS[script] = load_module(ROOT / script, f"_musubi_{Path(script).stem}").build_parser()
    return _PARSERS[script]


def _sample_values(row: dict) -> list[list[str]]:
    """Command-line values a musubi user may pass to this flag (every choice; typical values per type)."""
    if row.get("action") in ("store_true", "store_false"):
        return [[]]
    if row.get("choices"):
        return [[str(c)] for c in row["choices"]]
    kind = row.get("type")
    if kind == "_int_or_float":
        return [["10"], ["0.1"], ["5%"]]
    default = row.get("default")
    simple = {"int": "3", "float": "0.5"}.get(kind, str(default) if isinstance(default, str) and default else "x")
    return [[simple, simple]] if row.get("nargs") == "*" else [[simple]]


def _rows():
    for script, rows in TABLE["scripts"].items():
        for row in rows:
            yield pytest.param(script, row, id=f"{Path(script).stem}:{row['options'][0]}")


@pytest.mark.parametrize("script,row", list(_rows()))
def test_musubi_flag_is_known_or_refused_in_one_line(script, row):
    parser = _parser(script)
    missing = [o for o in row["options"] if o not in parser._option_string_actions]
    assert not missing, f"{script}: musubi flag(s) {missing} unknown here (implement or refuse in musubi_compat.py)"
    refused = row["options"][0] in REFUSED[_SCRIPT_KEY[script]]
    for values in _sample_values(row):
        argv = [row["options"][0], *values]
        try:
            parse_args(parser, argv)
        except UserError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 300, f"{argv}: not one line: {exc}"
            continue
        except SystemExit as exc:  # argparse's own error: exactly what must not happen
            pytest.fail(f"{script} {argv}: bare argparse failure (exit {exc.code})")
        assert not refused, f"{script} {argv}: a refused flag was accepted silently"


def test_refused_flag_in_a_config_file_is_refused_and_false_means_off(tmp_path):
    parser = _parser("kandinsky5_train_network.py")
    cfg = tmp_path / "run.toml"
    cfg.write_text("split_attn = true\n")
    with pytest.raises(UserError, match=r"--split_attn \(a musubi-tuner flag\) is not offered here"):
        parse_args(parser, ["--config_file", str(cfg)])
    cfg.write_text("split_attn = false\n")
    _PARSERS.pop("kandinsky5_train_network.py")  # set_defaults changed the cached parser
    parse_args(_parser("kandinsky5_train_network.py"), ["--config_file", str(tmp_path / "run")])  # finds run.toml
    _PARSERS.pop("kandinsky5_train_network.py")


def test_fixed_flag_accepts_only_our_value():
    parser = _parser("kandinsky5_cache_text_encoder_outputs.py")
    assert parse_args(parser, ["--qwen_max_length", "256"]).qwen_max_length == 256
    with pytest.raises(UserError, match=r"--qwen_max_length 512: only 256 is supported"):
        parse_args(parser, ["--qwen_max_length", "512"])


@pytest.mark.parametrize("script", sorted(_SCRIPT_KEY))
def test_help_shows_every_default(script):
    parser = _parser(script)
    formatter = HelpFormatter(script)
    silent = [
        a.option_strings[0]
        for a in parser._actions
        if a.option_strings
        and not isinstance(a, argparse._HelpAction)
        and a.default is not argparse.SUPPRESS
        and "default" not in formatter._get_help_string(a).lower()
    ]
    assert not silent, f"{script}: --help does not show the default of {silent}"
    assert parser.formatter_class is HelpFormatter


def test_cache_latents_disable_cudnn_backend(tiny_bundle, tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from kandinsky5.cli import run_main

    media = tmp_path / "media"
    media.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(media / "a.png")
    (media / "a.txt").write_text("a black square")
    toml = tmp_path / "d.toml"
    toml.write_text(f'[general]\nresolution = 32\ncaption_extension = ".txt"\n[[datasets]]\n'
                    f'image_directory = "{media.as_posix()}"\n')  # fmt: skip
    script = load_module(ROOT / "kandinsky5_cache_latents.py", "_musubi_cache_latents_run")
    argv = ["--dataset_config", str(toml), "--vae", str(tiny_bundle / "vae"), "--device", "cpu", "--vae_dtype", "fp32"]
    try:
        assert run_main(script.main, [*argv, "--disable_cudnn_backend"]) == 0
        assert torch.backends.cudnn.enabled is False and list(media.glob("*.safetensors"))
    finally:
        torch.backends.cudnn.enabled = True
