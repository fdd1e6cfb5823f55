"""``--show_timesteps``: the training timestep distribution and its loss weights, as text bars or a PNG; no model.

100000 times t are drawn with the run's own :class:`~kandinsky5.model.flow.TimestepConfig` (the trainer's sampler,
so ``--min_timestep`` / ``--max_timestep`` and every mode apply) and binned by ``int(1000 * t)`` into 1000 bins;
the loss weight of bin ``i`` is :func:`~kandinsky5.model.flow.loss_weight` at ``t = (i + 1) / 1000`` (1 when the
weighting scheme has none).  ``console`` prints 40 rows of 25 bins each (as musubi); ``image`` writes a two-panel
PNG.  The resolution-dependent modes use the task's default latent size (``width / 8 x height / 8``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from kandinsky5.common import UserError, atomic_path, get_logger
from kandinsky5.model import flow

log = get_logger(__name__)

N_DRAWS = 100_000
BINS = flow.NUM_TRAIN_TIMESTEPS
ROW = 25  # bins per console line
BAR = 64  # console bar width of the largest row


def histogram(
    cfg: flow.TimestepConfig, latent_hw: tuple[int, int], n: int = N_DRAWS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts, weights), each (1000,): draws per bin of ``int(1000 t)`` and the loss weight of each bin."""
    t = flow.sample_timesteps(cfg, n, torch.Generator().manual_seed(seed), latent_hw=latent_hw)
    counts = torch.bincount((t.double() * BINS).long().clamp(0, BINS - 1), minlength=BINS)
    centres = torch.arange(1, BINS + 1, dtype=torch.float32) / BINS
    weights = flow.loss_weight(cfg, centres)
    return counts, torch.ones(BINS) if weights is None else weights


def console_lines(counts: torch.Tensor, weights: torch.Tensor) -> list[str]:
    """musubi's console view: one line per 25 bins with a bar proportional to the mean count (then the weights)."""
    rows = counts.double().view(-1, ROW).mean(1)
    wrows = weights.double().view(-1, ROW).mean(1)
    lines = [f"sampled timesteps (1000 t), {int(counts.sum())} draws: max mean count per bin {rows.max():.1f}"]
    for i, value in enumerate(rows.tolist()):
        lines.append(f"{i * ROW:4d}-{(i + 1) * ROW - 1:4d}: " + "#" * int(value / max(rows.max(), 1e-12) * BAR))
    lines.append(f"loss weighting: max {wrows.max():.2f}")
    for i, value in enumerate(wrows.tolist()):
        bar = "#" * int(value / max(wrows.max(), 1e-12) * BAR)
        lines.append(f"{i * ROW:4d}-{(i + 1) * ROW - 1:4d}: {value:8.2f} {bar}")
    return lines


def write_png(path: Path, counts: torch.Tensor, weights: torch.Tensor, title: str) -> Path:
    """Two histograms (draws per timestep, loss weight per timestep) written to ``path`` (temp name, renamed)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("--show_timesteps image needs matplotlib: pip install matplotlib (or use console)") from None

    fig = Figure(figsize=(10, 4), layout="tight")
    left, right = fig.subplots(1, 2)
    edges = list(range(BINS + 1))
    left.stairs(counts.tolist(), edges, fill=True)
    left.set(title="sampled timesteps", xlabel="1000 t", ylabel="count")
    right.stairs(weights.tolist(), edges, fill=True)
    right.set(title="loss weighting", xlabel="1000 t", ylabel="weight")
    fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def show(cfg: flow.TimestepConfig, mode: str, latent_hw: tuple[int, int], png: Path | None) -> None:
    """Print the console histogram, or write the PNG to ``png``."""
    counts, weights = histogram(cfg, latent_hw)
    if mode == "console":
        print("\n".join(console_lines(counts, weights)))
        return
    title = f"{cfg.mode} (weighting {cfg.weighting_scheme}), range {cfg.min_timestep:g}-{cfg.max_timestep:g}"
    log.info("wrote the timestep histogram to %s", write_png(png, counts, weights, title))
