"""``bench/gpu_check.py --dry_run``: every check of the GPU acceptance script runs on the CPU at tiny sizes, so the
script cannot rot between GPU sessions (issue 11 item 8)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import load_module

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_passes_and_writes_table_and_json(tmp_path, capsys):
    gpu_check = load_module(ROOT / "bench" / "gpu_check.py", "gpu_check")
    assert gpu_check.main(["--dry_run", "--output", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "| check | configuration | result | status |" in out and "torch 2." in out and "dry run" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "report.md").read_text().strip() == out.strip()
    checks = {row["check"] for row in report["rows"]}
    assert checks == {c.name for c in gpu_check.CHECKS}
    statuses = {row["status"] for row in report["rows"]}
    assert "FAIL" not in statuses, [r for r in report["rows"] if r["status"] == "FAIL"]
