"""Write ``tests/data/musubi_k5_flags.json``: every command-line flag of musubi-tuner's four Kandinsky 5 scripts.

    python scripts/musubi_flag_table.py /work/.mirror/kohya-ss+musubi-tuner/repo [--commit HEAD]

The table is read from musubi's source with ``ast`` (nothing of musubi is imported or executed, and no code or help
text is copied): for each ``add_argument`` call in the functions that build the four parsers it records the option
strings, ``dest``, ``action``, ``type`` (a name), ``nargs``, ``choices`` (``null`` when not a literal) and
``default`` (the literal, or the expression as text).  ``tests/test_musubi_flags.py`` walks the table and checks
that each flag is either ours or refused with a one-line message.  Re-run it when musubi's parsers change.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "musubi_k5_flags.json"
SRC = "src/musubi_tuner/"
# our script -> [(musubi file, functions whose add_argument calls build its parser)]
PARSERS: dict[str, list[tuple[str, tuple[str, ...] | None]]] = {
    "kandinsky5_train_network.py": [
        ("training/parser_common.py", None),  # every _add_*_args helper of setup_parser_common
        ("kandinsky5_train_network.py", ("kandinsky5_setup_parser",)),
    ],
    "kandinsky5_generate_video.py": [("kandinsky5_generate_video.py", ("parse_args",))],
    "kandinsky5_cache_latents.py": [
        ("cache_latents.py", ("setup_parser_common",)),
        ("kandinsky5_cache_latents.py", ("main",)),
    ],
    "kandinsky5_cache_text_encoder_outputs.py": [
        ("cache_text_encoder_outputs.py", ("setup_parser_common",)),
        ("kandinsky5_cache_text_encoder_outputs.py", ("main",)),
    ],
}


def _literal(node: ast.AST) -> object:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return {"expr": ast.unparse(node)}


def _flag(call: ast.Call) -> dict[str, object]:
    options = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    kw = {k.arg: k.value for k in call.keywords if k.arg}
    long = next((o for o in options if o.startswith("--")), options[0])
    row: dict[str, object] = {"options": options, "dest": long.lstrip("-").replace("-", "_")}
    if "dest" in kw:
        row["dest"] = _literal(kw["dest"])
    if "action" in kw:
        row["action"] = _literal(kw["action"])
    if "type" in kw:
        row["type"] = ast.unparse(kw["type"])
    for key in ("nargs", "default", "required"):
        if key in kw:
            row[key] = _literal(kw[key])
    if "choices" in kw:
        value = _literal(kw["choices"])
        row["choices"] = value if isinstance(value, list | tuple) else None
    return row


def _calls(tree: ast.Module, functions: tuple[str, ...] | None) -> list[ast.Call]:
    def wanted(name: str) -> bool:
        return name in functions if functions is not None else name.startswith("_add_")

    calls = []
    for fn in tree.body:
        if isinstance(fn, ast.FunctionDef) and wanted(fn.name):
            calls += [
                n for n in ast.walk(fn)
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "add_argument"
            ]  # fmt: skip
    return calls


def read(repo: Path, commit: str, path: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "show", f"{commit}:{SRC}{path}"], check=True, capture_output=True, text=True
    ).stdout


def build_table(repo: Path, commit: str) -> dict[str, object]:
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", commit], check=True, capture_output=True, text=True)
    scripts = {}
    for script, sources in PARSERS.items():
        rows = []
        for path, functions in sources:
            rows += [_flag(c) for c in _calls(ast.parse(read(repo, commit, path)), functions)]
        scripts[script] = rows
    return {"source": f"kohya-ss/musubi-tuner@{head.stdout.strip()}", "scripts": scripts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("repo", type=Path, help="a musubi-tuner git repository (bare is fine)")
    p.add_argument("--commit", default="HEAD", help="commit to read (default HEAD)")
    p.add_argument("--out", type=Path, default=OUT, help=f"output JSON (default {OUT})")
    args = p.parse_args(argv)
    table = build_table(args.repo, args.commit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    print(f"{sum(len(v) for v in table['scripts'].values())} flags -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
