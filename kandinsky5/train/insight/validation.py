"""Validation loss: the flow-matching loss of held-out items at fixed timesteps with fixed noise, without gradients.

For every validation item i (canonical order: sorted by its key) and every t in ``ValidationConfig.timesteps``::

    eps_i  = randn(latents_i.shape)   from a CPU torch.Generator seeded with hash(seed, key_i): the same on every
                                      device, every run, every rank and at every resume
    loss_it = flow_matching_loss(DiT, item i, t, eps_i)          exactly the training objective (T2V; I2V with the
                                                                  same conditioning and loss masking as training)
    validation/t = mean_i loss_it        validation = mean_t validation/t

One DiT call per (item, t) with batch 1, so a number does not depend on batching or on the number of ranks.  Rank r
evaluates items r, r + W, ...; each rank writes its rows into a zero (items x timesteps) matrix and one SUM
all-reduce gives every rank the whole matrix exactly (the other ranks add zeros), so the means are computed in the
same order everywhere.  The LoRA is in eval mode (no dropout) and every RNG state (Python, NumPy, torch CPU/CUDA,
the training generator) is captured before and restored after, so validating never changes the training trajectory.

Layouts: a loaded item is a collated batch of one (``dataset.latent_dataset.collate``): latents ``(1, T, h, w, 16)``,
text ``(1, L, D)`` + mask ``(1, L)``, pooled ``(1, Dc)``, I2V ``latents_image`` ``(1, 2, h, w, 16)``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kandinsky5.common import UserError, get_logger, require_counts
from kandinsky5.train.config import VALIDATION_TIMESTEPS, ValidationConfig
from kandinsky5.train.distributed import DistContext
from kandinsky5.train.objective import batch_to_device, flow_matching_loss
from kandinsky5.train.state import capture_rng, restore_rng

log = get_logger(__name__)


def add_validation_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("validation loss (held-out items, fixed t and noise; see docs/training.md)")
    g.add_argument("--validation_split", type=float, default=0.0,
                   help="hold out this fraction of the cached items (chosen by item-key hash; default 0 = none; "
                        "datasets with is_validation = true are held out in any case)")  # fmt: skip
    g.add_argument(
        "--validate_every_n_steps",
        type=int,
        default=None,
        help="validation loss every N optimizer steps (default: only at step 0 and at the end)",
    )
    g.add_argument(
        "--validate_every_n_epochs",
        type=int,
        default=None,
        help="validation loss at the end of every N epochs (default: only at step 0 and at the end)",
    )
    g.add_argument("--validation_timesteps", default=",".join(f"{t:g}" for t in VALIDATION_TIMESTEPS),
                   help="flow times t (1 = noise) at which the validation loss is measured, comma separated "
                        "(default 0.1,0.3,0.5,0.7,0.9)")  # fmt: skip
    g.add_argument(
        "--validation_seed",
        type=int,
        default=0,
        help="seed of the fixed validation noise (default 0; independent of --seed)",
    )


def validation_config_from_args(args: argparse.Namespace) -> ValidationConfig:
    require_counts(args, ("validate_every_n_steps", "validate_every_n_epochs"))
    return ValidationConfig(
        split=args.validation_split,
        every_n_steps=args.validate_every_n_steps,
        every_n_epochs=args.validate_every_n_epochs,
        timesteps=parse_timesteps(args.validation_timesteps),
        seed=args.validation_seed,
    )


def parse_timesteps(text: str) -> tuple[float, ...]:
    """'0.1,0.5,0.9' (or space separated) -> (0.1, 0.5, 0.9); a bad value names the flag."""
    try:
        return tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise UserError(f"--validation_timesteps {text!r}: give numbers in (0, 1], e.g. 0.1,0.3,0.5,0.7,0.9") from None


@dataclass(frozen=True)
class ValidationResult:
    step: int
    mean: float
    per_t: tuple[tuple[float, float], ...]  # (t, mean loss over the items at t)
    items: int

    def scalars(self) -> dict[str, float]:
        """Tracker scalars: ``loss/validation`` and ``loss/validation/t<t>`` per timestep."""
        return {"loss/validation": self.mean, **{f"loss/validation/t{t:g}": v for t, v in self.per_t}}

    def describe(self) -> str:
        per_t = ", ".join(f"t={t:g} {v:.4f}" for t, v in self.per_t)
        return f"validation loss at step {self.step}: {self.mean:.4f} ({per_t}; {self.items} item(s))"

    def to_json(self) -> dict:
        return {"step": self.step, "mean": self.mean, "per_t": [list(p) for p in self.per_t], "items": self.items}

    @classmethod
    def from_json(cls, data: Mapping) -> ValidationResult:
        per_t = tuple((float(t), float(v)) for t, v in data["per_t"])
        return cls(int(data["step"]), float(data["mean"]), per_t, int(data["items"]))


def noise_seed(seed: int, key: str) -> int:
    """The seed of an item's validation noise: SHA-256 of (seed, key), 63 bits."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") >> 1


class Validator:
    """Computes :class:`ValidationResult` for the items ``keys`` (``load(i)`` gives item i as a collated batch)."""

    def __init__(self, keys: Sequence[str], load: Callable[[int], Mapping[str, torch.Tensor]], cfg: ValidationConfig):
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        self.keys = [keys[i] for i in order]
        self.indices = order  # position in the canonical order -> index for ``load``
        self.load, self.cfg = load, cfg

    def __len__(self) -> int:
        return len(self.keys)

    def __call__(self, run, step: int) -> ValidationResult:
        """Every rank calls this at the same step (it is a collective with several ranks)."""
        rng = capture_rng(run.generator)
        was_training = run.network.training
        run.network.eval()
        try:
            losses = self._losses(run)
        finally:
            run.network.train(was_training)
            restore_rng(rng, run.generator)
        per_t = tuple((t, float(losses[:, j].mean())) for j, t in enumerate(self.cfg.timesteps))
        mean = float(losses.mean())
        if not math.isfinite(mean):
            log.warning("validation loss at step %d is %s", step, mean)
        return ValidationResult(step, mean, per_t, len(self.keys))

    def _losses(self, run) -> torch.Tensor:
        """(items, timesteps) float64 matrix of losses, complete on every rank."""
        ctx: DistContext = run.ctx
        out = torch.zeros(len(self.keys), len(self.cfg.timesteps), dtype=torch.float64, device=ctx.device)
        rows = range(ctx.rank, len(self.keys), ctx.world_size)
        for row in rows:
            out[row] = self._item_losses(run, row)
        if run.engine is not None and run.engine.sharded:  # FSDP: every rank must make the same number of forwards
            for _ in range(-(-len(self.keys) // ctx.world_size) - len(rows)):
                self._item_losses(run, 0)  # gathers the shards with the others; the result is not used
        if ctx.distributed:
            dist.all_reduce(out)  # SUM: every other rank contributes zeros to this rank's rows
        return out.cpu()

    @torch.no_grad()
    def _item_losses(self, run, row: int) -> torch.Tensor:
        cfg, device = run.cfg, run.ctx.device
        batch = batch_to_device(self.load(self.indices[row]), device)
        gen = torch.Generator().manual_seed(noise_seed(self.cfg.seed, self.keys[row]))
        noise = torch.randn(batch.latents.shape, generator=gen, dtype=torch.float32).to(device)
        losses = []
        for t in self.cfg.timesteps:
            t_batch = torch.full((batch.latents.shape[0],), t, dtype=torch.float32, device=device)
            with torch.autocast(device.type, dtype=cfg.weight_dtype, enabled=cfg.autocast):
                loss = flow_matching_loss(run.dit, batch, t_batch, noise, cfg.task.rope_scale, cfg.i2v_mode)
            losses.append(loss.double())
        return torch.stack(losses)


def build_validator(cfg, items: Sequence, dataset, collate: Callable) -> Validator | None:
    """The validator over the held-out ``items`` (``dataset.latent_dataset.CachedItem``; ``dataset[i]`` reads item
    i, ``collate`` batches it), or None without items, where a ``--validate_every_n_*`` flag is an error."""
    v = cfg.validation
    if not items:
        if v.every_n_steps or v.every_n_epochs:
            raise UserError("--validate_every_n_steps/epochs need validation items: give --validation_split F or "
                            "mark a dataset with is_validation = true in the dataset TOML")  # fmt: skip
        return None
    keys = [f"{it.item_key}|{it.latent_path.name}" for it in items]
    times = ", ".join(f"{t:g}" for t in v.timesteps)
    log.info("validation: %d held-out item(s) (%d media item(s)); loss at t = %s with fixed noise (seed %d)",
             len(items), len({it.item_key for it in items}), times, v.seed)  # fmt: skip
    return Validator(keys, lambda i: collate([dataset[i]]), v)


def validate(run) -> None:
    """The validation loss at the run's current step, reported to ``run.monitor`` (every rank calls this at the same
    step: it is a collective); at most once per step, nothing without a validator."""
    done = run.monitor.history.validation
    if run.validator is not None and not (done and done[-1].step == run.progress.step):
        run.monitor.on_validation(run.validator(run, run.progress.step))
