"""Run every benchmark script in bench/ and print their results as one markdown table.

Usage: bench/run_all [--full]   (a wrapper that runs this file with .venv/bin/python); without --full each script
runs in its --quick mode, a few minutes on a 2-core CPU.

Each script prints a markdown table; this runner keeps the first column(s) that name the configuration and folds
the measured columns into ``name=value`` pairs, one row per configuration, under the script's name.  The device line
and the date come first so the table can be pasted into docs/performance.md as it is.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# script -> number of leading columns that describe the configuration (the rest are measurements)
SCRIPTS = {
    "bench_sampling.py": 3,
    "bench_sampling.py --magcache": 1,
    "bench_train_step.py": 1,
    "bench_memory.py": 3,
    "bench_transients.py": 2,
    "bench_activations.py": 1,
    "bench_distributed.py": 2,
    "bench_attention.py": 4,
}


def table_rows(text: str) -> tuple[list[str], list[list[str]]]:
    """Header and body rows of the last markdown table in ``text``."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    header, rows = [], []
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if all(set(c) <= set("-: ") for c in cells):
            continue
        if not header or (rows and cells[0] == header[0]):
            header, rows = cells, []
        else:
            rows.append(cells)
    return header, rows


def run(script: str, full: bool) -> tuple[str, str]:
    name, *extra = script.split()
    cmd = [sys.executable, str(HERE / name), *extra] + ([] if full else ["--quick"])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
    if out.returncode != 0:
        raise SystemExit(f"{script} failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    context = next((line for line in out.stdout.splitlines() if line.strip() and not line.startswith("|")), "")
    return out.stdout, context.strip()


def device_line() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    return f"{datetime.date.today()}, {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> int:
    p = argparse.ArgumentParser(description="Run all benchmarks and print one markdown table.")
    p.add_argument("--full", action="store_true", help="run each script with its default (full) settings")
    args = p.parse_args()
    print(device_line())
    print("\n| benchmark | configuration | results |\n|---|---|---|")
    for script, keys in SCRIPTS.items():
        text, context = run(script, args.full)
        header, rows = table_rows(text)
        for row in rows:
            config = ", ".join(f"{h}={v}" for h, v in zip(header[:keys], row[:keys]))
            results = ", ".join(f"{h}={v}" for h, v in zip(header[keys:], row[keys:]))
            print(f"| {script.replace('.py', '')} | {config} | {results} |")
        print(f"| {script.replace('.py', '')} | setup | {context} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
