"""Pictures that show how a run went: the loss curve (``loss.png``), the contact sheet of a sampling event and the
frame strip sent to the trackers.  Pure functions of their inputs (the summary block is ``monitor.summary_lines``).

Layouts: frames are ``(F, H, W, 3)`` uint8 (``video_io.to_uint8_frames``); images returned are ``(H, W, 3)`` uint8.

* Contact sheet: one row per prompt; a label strip of :data:`LABEL_HEIGHT` px ("#i  step s  seed d  prompt") above
  up to :data:`SHEET_COLUMNS` frames spaced evenly from the first to the last.  Frames are scaled to one cell height
  (the tallest frame, clamped to [:data:`CELL_MIN`, :data:`CELL_MAX`] px) keeping their aspect ratio; the sheet is
  as wide as its widest row (at least :data:`SHEET_MIN_WIDTH`).  Drawn with PIL.
* Loss curve: matplotlib (Agg canvas, no pyplot state), :data:`LOSS_FIGSIZE` inches at :data:`LOSS_DPI` dpi:
  training loss per step (thin), its moving average (bold), the validation loss (dots), the learning rate on a
  second axis (dashed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kandinsky5.common import atomic_path

__all__ = [
    "SheetRow",
    "contact_sheet",
    "frame_strip",
    "sheet_frame_indices",
    "loss_plot",
    "format_duration",
]

SHEET_COLUMNS = 8
LABEL_HEIGHT = 20
CELL_MIN, CELL_MAX = 128, 256
SHEET_MIN_WIDTH = 512
LOSS_FIGSIZE = (9.0, 5.0)
LOSS_DPI = 100


def format_duration(seconds: float) -> str:
    """3725.4 -> '1:02:05'."""
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def sheet_frame_indices(num_frames: int, columns: int = SHEET_COLUMNS) -> list[int]:
    """Up to ``columns`` frame indices spaced evenly over the clip, first and last included."""
    if num_frames <= columns:
        return list(range(num_frames))
    return [round(i * (num_frames - 1) / (columns - 1)) for i in range(columns)]


def frame_strip(frames: np.ndarray) -> np.ndarray:
    """First, middle and last frame side by side (H, 3W, 3); a 1-frame sample is returned as it is."""
    if frames.shape[0] == 1:
        return frames[0]
    picks = sorted({0, frames.shape[0] // 2, frames.shape[0] - 1})
    return np.concatenate([frames[i] for i in picks], axis=1)


@dataclass(frozen=True)
class SheetRow:
    label: str  # e.g. "#0  step 100  seed 42  a cat walks"
    frames: np.ndarray  # (F, H, W, 3) uint8


def _font(size: int = 13):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fit_label(draw, text: str, width: int, font) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def contact_sheet(rows: Sequence[SheetRow], path: Path) -> Path:
    """Write the contact sheet PNG of one sampling event (see the module docstring) to ``path`` atomically."""
    from PIL import Image, ImageDraw

    cell_h = min(max(max(r.frames.shape[1] for r in rows), CELL_MIN), CELL_MAX)
    scaled = []
    for r in rows:
        h, w = r.frames.shape[1:3]
        size = (max(1, round(w * cell_h / h)), cell_h)
        scaled.append([Image.fromarray(r.frames[i]).resize(size, Image.Resampling.BICUBIC)
                       for i in sheet_frame_indices(r.frames.shape[0])])  # fmt: skip
    width = max(SHEET_MIN_WIDTH, max(sum(im.width for im in row) for row in scaled))
    sheet = Image.new("RGB", (width, len(rows) * (LABEL_HEIGHT + cell_h)), (24, 24, 24))
    draw, font = ImageDraw.Draw(sheet), _font()
    for k, (row, images) in enumerate(zip(rows, scaled)):
        top = k * (LABEL_HEIGHT + cell_h)
        draw.text((4, top + 3), _fit_label(draw, row.label, width - 8, font), fill=(235, 235, 235), font=font)
        x = 0
        for im in images:
            sheet.paste(im, (x, top + LABEL_HEIGHT))
            x += im.width
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def loss_plot(
    path: Path,
    title: str,
    steps: Sequence[int],
    loss: Sequence[float],
    average: Sequence[float],
    lr: Sequence[float],
    validation: Sequence[tuple[int, float]] = (),
    window: int = 1,
) -> Path:
    """Write ``loss.png`` (see the module docstring) to ``path`` atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=LOSS_FIGSIZE, dpi=LOSS_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lines = ax.plot(steps, loss, color="tab:blue", alpha=0.35, linewidth=0.8, label="training loss")
    lines += ax.plot(steps, average, color="tab:blue", linewidth=2, label=f"moving average ({window} steps)")
    if validation:
        vs, vl = zip(*validation)
        lines += ax.plot(vs, vl, "o-", color="tab:orange", linewidth=1.5, markersize=4, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lines += lr_ax.plot(steps, lr, "--", color="tab:gray", linewidth=1, label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_ylim(0, 1.1 * max([v for v in lr if math.isfinite(v)] + [0.0]) or 1.0)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
