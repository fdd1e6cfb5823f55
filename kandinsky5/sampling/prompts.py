"""Prompt files: one generation per line with per-line overrides, or musubi-tuner's ``.toml`` / ``.json`` prompt files.

Used by ``kandinsky5_generate_video.py --prompt_file`` and by the trainer's ``--sample_prompts``.  A text line is::

    A cat walks on the grass, realistic style. --w 512 --h 512 --f 17 --d 42 --s 30 --g 5 --n low quality

Everything before the first `` --`` is the prompt; each following `` --key value`` piece overrides one setting
(the value runs to the next `` --``, so negative prompts may contain spaces; keys are case-insensitive, as in
musubi).  Blank lines and lines starting with ``#`` are skipped.

======  =====================  ===========================================================================
key     field                  meaning
======  =====================  ===========================================================================
``w``   ``width``              output width in pixels (multiple of 16)
``h``   ``height``             output height in pixels (multiple of 16)
``f``   ``frames``             number of VIDEO frames, 4k+1 (1, 5, 9, ..., 121).  musubi's Kandinsky 5 sampler
                               counts latent frames here (its defect #11); we do not: ``--f 17`` is 17 video
                               frames (5 latent), musubi's ``--f 17`` is our ``--f 65``
``d``   ``seed``               noise seed
``s``   ``steps``              denoising steps
``g``   ``guidance``           classifier-free guidance weight (1 = no unconditional pass)
``n``   ``negative_prompt``    negative prompt for CFG
``i``   ``image``              first-frame image (I2V)
``l``   ``image_last``         last-frame image (first+last conditioning; needs ``--i``).  In musubi ``--l`` is
                               ``cfg_scale`` (a number): a numeric ``--l`` is an error saying so
``ei``  ``image_last``         musubi's end image: the same as ``--l``
======  =====================  ===========================================================================

musubi keys that have no meaning for Kandinsky 5 (``fs``, ``cn``, ``ci``, ``of``, ``e``) are ignored with a
warning (musubi ignores them for Kandinsky 5 too); any other key is an error naming ``file:line``.

musubi's structured files (``.toml``: a ``[prompt]`` table of defaults and ``[[prompt.subset]]`` entries, each
merged over the defaults; ``.json``: a list of prompt objects or prompt lines) use musubi's keys: ``prompt``,
``width``, ``height``, ``frame_count`` (video frames, see ``f``), ``seed``, ``sample_steps``, ``guidance_scale``,
``negative_prompt``, ``image_path``, ``end_image_path`` (and the short ``w``, ``h``, ``f``, ``s`` musubi's
Kandinsky 5 sampler also reads); ``discrete_flow_shift``, ``cfg_scale``, ``control_video_path``,
``control_image_path`` and ``one_frame`` are ignored with a warning.  Errors name the file and the line of the
entry or key.  Unset fields are ``None`` (the caller applies its defaults).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from kandinsky5.common import UserError, get_logger
from kandinsky5.configs import latent_frames

__all__ = [
    "PromptLine",
    "parse_prompt_line",
    "read_prompt_file",
    "prompt_from_dict",
    "describe_frames",
    "musubi_frames_hint",
    "prepend_trigger",
    "LINE_KEYS",
    "DICT_KEYS",
]

log = get_logger(__name__)


@dataclass(frozen=True)
class PromptLine:
    """One parsed prompt (a text line or a musubi prompt object); ``None`` = not set."""

    prompt: str
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    image: str | None = None
    image_last: str | None = None
    source: str | None = None  # "file:line" for messages; not a setting

    def overrides(self) -> dict[str, object]:
        """The settings given on the line (prompt and source excluded)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("prompt", "source") and getattr(self, f.name) is not None
        }


# key -> (field, converter)
LINE_KEYS: dict[str, tuple[str, type]] = {
    "w": ("width", int),
    "h": ("height", int),
    "f": ("frames", int),
    "d": ("seed", int),
    "s": ("steps", int),
    "g": ("guidance", float),
    "n": ("negative_prompt", str),
    "i": ("image", str),
    "l": ("image_last", str),
    "ei": ("image_last", str),
}
_IGNORED_MUSUBI_KEYS = {
    "fs": "musubi's sampling flow shift, which its Kandinsky 5 sampler ignores too (the shift here is "
    "--scheduler_scale)",
    "cn": "a control video, not a Kandinsky 5 input",
    "ci": "a control image, not a Kandinsky 5 input",
    "of": "FramePack's one-frame output, not a Kandinsky 5 setting",
    "e": "not a Kandinsky 5 setting",
}
# musubi prompt-object key -> field (musubi's long names, the short ones its Kandinsky 5 sampler reads, ours)
DICT_KEYS: dict[str, str] = {
    "prompt": "prompt",
    **{k: "width" for k in ("width", "w")},
    **{k: "height" for k in ("height", "h")},
    **{k: "frames" for k in ("frame_count", "frames", "f")},
    **{k: "seed" for k in ("seed", "d")},
    **{k: "steps" for k in ("sample_steps", "steps", "s")},
    **{k: "guidance" for k in ("guidance_scale", "guidance", "g")},
    **{k: "negative_prompt" for k in ("negative_prompt", "n")},
    **{k: "image" for k in ("image_path", "image", "i")},
    **{k: "image_last" for k in ("end_image_path", "image_last")},
}
_IGNORED_DICT_KEYS = {
    "discrete_flow_shift": _IGNORED_MUSUBI_KEYS["fs"],
    "cfg_scale": "the CFG of models with embedded guidance, which musubi's Kandinsky 5 sampler ignores too (CFG "
    "here is guidance_scale)",
    "control_video_path": _IGNORED_MUSUBI_KEYS["cn"],
    "control_image_path": _IGNORED_MUSUBI_KEYS["ci"],
    "one_frame": _IGNORED_MUSUBI_KEYS["of"],
    "enum": "musubi's internal index",
}
_FIELD_KINDS = {"prompt": str, **{f: c for f, c in LINE_KEYS.values()}}
_PIECE = re.compile(r"^(?P<key>[A-Za-z_]+)(?:\s+(?P<value>.*))?$", re.DOTALL)
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def describe_frames(frames: int) -> str:
    """'17 video frames (5 latent)': the effective length (musubi's Kandinsky 5 ``--frames`` counts latent frames)."""
    return f"{frames} video frame{'s' if frames != 1 else ''} ({latent_frames(frames)} latent)"


def musubi_frames_hint(frames: int) -> str:
    """How a musubi Kandinsky 5 user's latent-frame count reads here."""
    return f"musubi's Kandinsky 5 sampler counts latent frames: its --f {frames} is --f {4 * (frames - 1) + 1} here"


def _convert(key: str, raw: str | None, where: str) -> tuple[str, object]:
    field, conv = LINE_KEYS[key]
    if raw is None or not raw.strip():
        raise UserError(f"{where}: --{key} needs a value")
    value = raw.strip()
    if key == "l" and _NUMBER.match(value):
        raise UserError(
            f"{where}: --l {value}: here --l is the last-frame image; in musubi --l is cfg_scale, the CFG of models "
            f"with embedded guidance, which musubi ignores for Kandinsky 5. For CFG write --g {value}; for a last "
            "frame --l path/to/image.png"
        )
    try:
        return field, conv(value)
    except ValueError:
        raise UserError(f"{where}: --{key} expects {conv.__name__}, got {value!r}") from None


def parse_prompt_line(line: str, where: str = "prompt") -> PromptLine | None:
    """Parse one line; ``None`` for a blank or ``#`` comment line.  ``where`` prefixes error messages."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    pieces = text.split(" --")
    prompt = pieces[0].strip()
    if prompt.startswith("--"):
        raise UserError(f"{where}: the line starts with an option; put the prompt text first")
    values: dict[str, object] = {}
    for piece in pieces[1:]:
        m = _PIECE.match(piece.strip())
        key = m.group("key").lower() if m else piece.strip()[:10]
        if key in _IGNORED_MUSUBI_KEYS:
            log.warning("%s: option --%s is ignored: %s", where, key, _IGNORED_MUSUBI_KEYS[key])
            continue
        if m is None or key not in LINE_KEYS:
            valid = ", ".join(f"--{k}" for k in LINE_KEYS)
            raise UserError(f"{where}: unknown option --{key}; valid options: {valid}")
        field, value = _convert(key, m.group("value"), where)
        values[field] = value
    if not prompt:
        raise UserError(f"{where}: empty prompt")
    return PromptLine(prompt=prompt, source=where, **values)


def _typed(field: str, value: object, key: str, where: str) -> object:
    kind = _FIELD_KINDS[field]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and not (number and float(value).is_integer()):
        raise UserError(f"{where}: {key} must be an integer, got {value!r}")
    if kind is float and not number:
        raise UserError(f"{where}: {key} must be a number, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise UserError(f"{where}: {key} must be a string, got {value!r}")
    return kind(value)


def prompt_from_dict(entry: dict, where: str, key_line=None, defaults: dict | None = None) -> PromptLine:
    """A musubi prompt object (a ``.json`` list item, or a ``.toml`` subset over the ``[prompt]`` ``defaults``)
    -> PromptLine.  ``key_line(key)`` gives the ``file:line`` of a key for messages (default: ``where``)."""
    at = key_line or (lambda key: where)
    values = {**_fields(defaults or {}, at), **_fields(entry, at)}
    if not str(values.get("prompt", "")).strip():
        raise UserError(f'{where}: the entry has no prompt (add prompt = "...")')
    return PromptLine(**{**values, "prompt": values["prompt"].strip()}, source=where)


def _fields(entry: dict, at) -> dict[str, object]:
    """musubi keys -> our field names with checked types (ignored keys dropped with a warning)."""
    values: dict[str, object] = {}
    for key, value in entry.items():
        if key in _IGNORED_DICT_KEYS:
            log.warning("%s: %s is ignored: %s", at(key), key, _IGNORED_DICT_KEYS[key])
            continue
        if key not in DICT_KEYS:
            raise UserError(f"{at(key)}: unknown key {key!r}; valid keys: {', '.join(DICT_KEYS)}")
        field = DICT_KEYS[key]
        if field in values:
            raise UserError(f"{at(key)}: {key!r} sets {field} a second time (another spelling of it is given)")
        values[field] = _typed(field, value, key, at(key))
    return values


# ----------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _text_lines(path: Path, text: str) -> list[PromptLine]:
    lines = [parse_prompt_line(raw, where=f"{path}:{n}") for n, raw in enumerate(text.splitlines(), start=1)]
    return [line for line in lines if line is not None]


def _toml_sections(text: str) -> tuple[int | None, list[int]]:
    """Line numbers of ``[prompt]`` and of each ``[[prompt.subset]]`` header (or of ``subset = [...]``)."""
    prompt, subsets = None, []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if re.fullmatch(r"\[\s*prompt\s*\]", line):
            prompt = number
        elif re.fullmatch(r"\[\[\s*prompt\.subset\s*\]\]", line) or re.match(r"subset\s*=", line):
            subsets.append(number)
    return prompt, subsets


def _key_line(text: str, start: int | None, key: str) -> int | None:
    """The first ``key =`` line after line ``start`` and before the next table header."""
    if start is None:
        return None
    for number, raw in enumerate(text.splitlines()[start:], start=start + 1):
        if raw.strip().startswith("["):
            return None
        if re.match(rf"\s*['\"]?{re.escape(key)}['\"]?\s*=", raw):
            return number
    return None


def _toml_prompts(path: Path, text: str) -> list[PromptLine]:
    import toml

    try:
        data = toml.loads(text)
    except toml.TomlDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid TOML: {exc.msg}") from None
    prompt_line, subset_lines = _toml_sections(text)
    table = data.get("prompt")
    if set(data) - {"prompt"} or not isinstance(table, dict):
        raise UserError(f"{path}:1: a musubi prompt file has one [prompt] table (defaults) with [[prompt.subset]] "
                        "entries; nothing else")  # fmt: skip
    subsets = table.get("subset")
    if not isinstance(subsets, list) or not subsets or not all(isinstance(s, dict) for s in subsets):
        raise UserError(f"{path}:{prompt_line or 1}: [prompt] needs at least one [[prompt.subset]] entry")
    defaults = {k: v for k, v in table.items() if k != "subset"}
    out = []
    for i, subset in enumerate(subsets):
        start = subset_lines[i] if i < len(subset_lines) else prompt_line
        at = functools.partial(_toml_at, path, text, start, prompt_line, frozenset(subset))
        out.append(prompt_from_dict(subset, f"{path}:{start or 1}", at, defaults))
    return out


def _toml_at(path: Path, text: str, start: int | None, prompt: int | None, own: frozenset, key: str) -> str:
    """``file:line`` of ``key``: in its subset entry (keys ``own``), else in [prompt], else the entry's header."""
    line = _key_line(text, start, key) if key in own else _key_line(text, prompt, key)
    return f"{path}:{line or start or 1}"


def _json_items(text: str) -> list[tuple[int, object, int]]:
    """(start offset, value, end offset) of each item of the top-level JSON list (the text is valid JSON)."""
    decoder, items = json.JSONDecoder(), []
    pos = text.index("[") + 1
    while True:
        pos += len(text[pos:]) - len(text[pos:].lstrip())
        if text[pos] == "]":
            return items
        value, end = decoder.raw_decode(text, pos)
        items.append((pos, value, end))
        pos = end + len(text[end:]) - len(text[end:].lstrip())
        pos += text[pos] == ","


def _json_at(path: Path, text: str, start: int, end: int, key: str) -> str:
    """``file:line`` of ``"key"`` inside the list item at ``text[start:end]`` (the item's line if not found)."""
    found = text.find(json.dumps(key), start, end)
    return f"{path}:{text.count(chr(10), 0, found if found >= 0 else start) + 1}"


def _json_prompts(path: Path, text: str) -> list[PromptLine]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}:1: a musubi prompt JSON is a non-empty list of prompt objects or prompt lines")
    out = []
    for start, item, end in _json_items(text):
        line = text.count("\n", 0, start) + 1
        at = functools.partial(_json_at, path, text, start, end)
        if isinstance(item, str):
            parsed = parse_prompt_line(item, where=f"{path}:{line}")
            if parsed is not None:
                out.append(parsed)
        elif isinstance(item, dict):
            out.append(prompt_from_dict(item, f"{path}:{line}", at))
        else:
            raise UserError(f"{path}:{line}: a list item must be a prompt object or a prompt line, got {item!r}")
    return out


def read_prompt_file(path: str | Path, flag: str = "--prompt_file") -> list[PromptLine]:
    """All prompts of a text, musubi ``.toml`` or musubi ``.json`` file (errors name ``file:line``); an empty
    file is an error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path} does not exist")
    text = _read_text(path)
    reader = {".toml": _toml_prompts, ".json": _json_prompts}.get(path.suffix.lower(), _text_lines)
    lines = reader(path, text)
    if not lines:
        raise UserError(f"{flag} {path} has no prompts (only blank or # comment lines)")
    given = next((line for line in lines if line.frames is not None), None)
    if given is not None:
        log.info("%s: --f / frame_count %d counts VIDEO frames here (%s)", given.source, given.frames,
                 musubi_frames_hint(given.frames))  # fmt: skip
    return lines


def prepend_trigger(trigger: str, prompt: str) -> str:
    """``trigger + prompt`` as the official pipeline prepends a LoRA's ``trigger`` metadata; a space is inserted
    when neither side has one at the joint, and a prompt that already starts with the trigger is left alone."""
    if not trigger or prompt.startswith(trigger):
        return prompt
    joint = "" if trigger[-1:].isspace() or prompt[:1].isspace() or not prompt else " "
    return trigger + joint + prompt
