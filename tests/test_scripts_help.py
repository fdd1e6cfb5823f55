"""Every flag of the four scripts has English help text, and ``--help`` exits 0."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tests.helpers import load_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in ROOT.glob("kandinsky5_*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help(script, capsys):
    assert len(SCRIPTS) == 4
    module = load_module(ROOT / script, f"_help_{Path(script).stem}")
    parser = module.build_parser()
    missing = [
        a.option_strings[0]
        for a in parser._actions
        if a.option_strings and not isinstance(a, argparse._HelpAction) and len((a.help or "").strip()) < 8
    ]
    assert not missing, f"{script}: flags without help text: {missing}"
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out
