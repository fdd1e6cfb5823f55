"""Prompt files: one generation per line with per-line overrides (musubi's sample-prompt format).

Used by ``kandinsky5_generate_video.py --prompt_file`` and by the trainer's sample-during-training.  A line is::

    A cat walks on the grass, realistic style. --w 512 --h 512 --f 17 --d 42 --s 30 --g 5 --n low quality

Everything before the first `` --`` is the prompt; each following `` --key value`` piece overrides one setting
(the value runs to the next `` --``, so negative prompts may contain spaces).  Blank lines and lines starting
with ``#`` are skipped.

======  =====================  ===========================================================================
key     field                  meaning
======  =====================  ===========================================================================
``w``   ``width``              output width in pixels (multiple of 16)
``h``   ``height``             output height in pixels (multiple of 16)
``f``   ``frames``             number of VIDEO frames, 4k+1 (1, 5, 9, ..., 121).  musubi counts latent frames
                               here (its defect #11); we do not: ``--f 17`` is 17 video frames
``d``   ``seed``               noise seed
``s``   ``steps``              denoising steps
``g``   ``guidance``           classifier-free guidance weight (1 = no unconditional pass)
``n``   ``negative_prompt``    negative prompt for CFG
``i``   ``image``              first-frame image (I2V)
``l``   ``image_last``         last-frame image (first+last conditioning; needs ``--i``)
======  =====================  ===========================================================================

musubi keys that have no meaning for Kandinsky 5 (``fs``, ``cn``, ``ci``, ``ei``, ``of``, ``e``) are ignored with a
warning; any other key is an error naming the line.  Unset fields are ``None`` (the caller applies its defaults).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from kandinsky5.common import UserError, get_logger

__all__ = ["PromptLine", "parse_prompt_line", "read_prompt_file", "prepend_trigger", "LINE_KEYS"]

log = get_logger(__name__)


@dataclass(frozen=True)
class PromptLine:
    """One parsed prompt line; ``None`` = not set on the line."""

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

    def overrides(self) -> dict[str, object]:
        """The fields set on the line (prompt excluded)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "prompt" and getattr(self, f.name) is not None
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
}
_IGNORED_MUSUBI_KEYS = ("fs", "cn", "ci", "ei", "of", "e")
_PIECE = re.compile(r"^(?P<key>[A-Za-z_]+)(?:\s+(?P<value>.*))?$", re.DOTALL)


def _convert(key: str, raw: str | None, where: str) -> tuple[str, object]:
    field, conv = LINE_KEYS[key]
    if raw is None or not raw.strip():
        raise UserError(f"{where}: --{key} needs a value")
    try:
        return field, conv(raw.strip())
    except ValueError:
        raise UserError(f"{where}: --{key} expects {conv.__name__}, got {raw.strip()!r}") from None


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
        key = m.group("key") if m else piece.strip()[:10]
        if key in _IGNORED_MUSUBI_KEYS:
            log.warning("%s: option --%s has no meaning for Kandinsky 5 and is ignored", where, key)
            continue
        if m is None or key not in LINE_KEYS:
            valid = ", ".join(f"--{k}" for k in LINE_KEYS)
            raise UserError(f"{where}: unknown option --{key}; valid options: {valid}")
        field, value = _convert(key, m.group("value"), where)
        values[field] = value
    if not prompt:
        raise UserError(f"{where}: empty prompt")
    return PromptLine(prompt=prompt, **values)


def read_prompt_file(path: str | Path) -> list[PromptLine]:
    """All prompt lines of a UTF-8 text file (errors name ``file:line``); an empty file is an error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompt_file {path} does not exist")
    lines = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parsed = parse_prompt_line(raw, where=f"{path}:{number}")
        if parsed is not None:
            lines.append(parsed)
    if not lines:
        raise UserError(f"--prompt_file {path} has no prompts (only blank or # comment lines)")
    return lines


def prepend_trigger(trigger: str, prompt: str) -> str:
    """``trigger + prompt`` as the official pipeline prepends a LoRA's ``trigger`` metadata; a space is inserted
    when neither side has one at the joint, and a prompt that already starts with the trigger is left alone."""
    if not trigger or prompt.startswith(trigger):
        return prompt
    joint = "" if trigger[-1:].isspace() or prompt[:1].isspace() or not prompt else " "
    return trigger + joint + prompt
