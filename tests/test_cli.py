"""Shared CLI groups: task lookup, attention/NABLA flag resolution, --config_file merging."""

from __future__ import annotations

import argparse

import pytest

from kandinsky5.cli import (
    add_attention_args,
    add_config_file_arg,
    add_memory_args,
    add_model_args,
    attention_spec_from_args,
    parse_args,
    run_main,
    task_from_args,
)
from kandinsky5.common import UserError


def _parser():
    p = argparse.ArgumentParser()
    add_model_args(p)
    add_attention_args(p)
    add_memory_args(p, training=True)
    add_config_file_arg(p)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    return p


def test_unknown_task_lists_valid_ones():
    args = parse_args(_parser(), ["--task", "k5-nope"])
    with pytest.raises(UserError, match="k5-pro-t2v-5s-sd") as err:
        task_from_args(args)
    assert "k5-tiny-t2v" in str(err.value)


def test_attention_backend_and_conflicts():
    args = parse_args(_parser(), ["--task", "k5-tiny-t2v", "--sdpa"])
    spec = attention_spec_from_args(args, task_from_args(args))
    assert spec.backend == "sdpa" and spec.nabla is None
    args = parse_args(_parser(), ["--task", "k5-tiny-t2v", "--sdpa", "--xformers"])
    with pytest.raises(UserError, match="choose one attention backend"):
        attention_spec_from_args(args, task_from_args(args))


def test_missing_optional_backend_is_a_clear_error():
    args = parse_args(_parser(), ["--task", "k5-tiny-t2v", "--flash_attn"])
    with pytest.raises(UserError, match="pip install flash-attn"):
        attention_spec_from_args(args, task_from_args(args))


def test_nabla_flags():
    args = parse_args(_parser(), ["--task", "k5-lite-t2v-10s-sd", "--nabla_P", "0.5", "--no_nabla_add_sta"])
    nabla = attention_spec_from_args(args, task_from_args(args)).nabla
    assert nabla.P == 0.5 and nabla.add_sta is False and nabla.wT == 11
    args = parse_args(_parser(), ["--task", "k5-tiny-t2v", "--force_nabla_attention", "--nabla_wT", "5"])
    nabla = attention_spec_from_args(args, task_from_args(args)).nabla
    assert nabla.wT == 5 and nabla.P == 0.9 and nabla.add_sta
    args = parse_args(_parser(), ["--task", "k5-tiny-t2v", "--nabla_P", "0.5"])
    with pytest.raises(UserError, match="--force_nabla_attention"):
        attention_spec_from_args(args, task_from_args(args))


def test_config_file_values_and_unknown_keys(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('task = "k5-tiny-t2v"\nlearning_rate = 3e-4\n[memory]\nblocks_to_swap = 2\n')
    args = parse_args(_parser(), ["--config_file", str(cfg), "--learning_rate", "5e-5"])
    assert args.task == "k5-tiny-t2v" and args.blocks_to_swap == 2 and args.learning_rate == 5e-5
    cfg.write_text("learning_rat = 1.0\n")
    with pytest.raises(UserError, match="unknown key 'learning_rat'.*learning_rate"):
        parse_args(_parser(), ["--config_file", str(cfg)])


def test_run_main_prints_one_line(capsys):
    def main(argv):
        raise UserError("something is wrong; do this")

    assert run_main(main, []) == 1
    assert capsys.readouterr().err == "error: something is wrong; do this\n"
