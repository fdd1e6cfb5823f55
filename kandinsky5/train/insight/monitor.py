"""What a training run shows while it runs and when it ends: the progress bar, one line per epoch, the trackers
(TensorBoard / wandb), ``loss.png`` and ``history.json`` in the run folder, and the end-of-run summary block.

``History`` holds every number measured so far (per optimizer step: loss, moving average, LR, gradient norm; the
validation results; epoch means; the checkpoints written).  It is saved as ``history.json`` in every state directory
(so ``--resume`` continues the curves, the moving average and the TensorBoard run folder) and in the run folder.
Every rank keeps the same history (step losses and validation results are reduced over ranks); only rank 0 prints,
draws and talks to the trackers.

Moving average: the mean of the last ``window`` step losses, ``window`` = optimizer steps per epoch (musubi's
``avr_loss``: the running mean during the first epoch, a one-epoch sliding window afterwards).

Tracker scalars (musubi's names where musubi has the quantity): ``loss/current``, ``loss/average``, ``lr``,
``grad_norm``, ``steps_per_sec`` every step; ``loss/epoch`` at the last step of each epoch (musubi logs it at
x = epoch number; here the x axis is always the optimizer step); ``loss/validation`` and ``loss/validation/t<t>``
at each validation; images ``samples/<i>`` (first / middle / last frame) at each sampling event.
"""

from __future__ import annotations

import json
import shlex
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kandinsky5.common import atomic_path, get_logger
from kandinsky5.train.insight.report import format_duration, frame_strip, loss_plot
from kandinsky5.train.insight.tracker import Tracker, TrackerConfig, new_run_folder, open_tracker
from kandinsky5.train.insight.validation import ValidationResult

log = get_logger(__name__)

HISTORY_FILE = "history.json"
LOSS_PLOT = "loss.png"
RATE_WINDOW = 20  # steps over which the steps_per_sec scalar is measured


@dataclass
class History:
    """Everything measured so far; JSON round trip through :meth:`to_json` / :meth:`from_json`."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    average: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    validation: list[ValidationResult] = field(default_factory=list)
    epochs: list[tuple[int, int, float]] = field(default_factory=list)  # (epoch, last step, mean loss)
    checkpoints: list[tuple[int, str]] = field(default_factory=list)  # (step, LoRA path)
    run_folder: str | None = None
    wandb_id: str | None = None

    def to_json(self) -> dict:
        data = {k: v for k, v in vars(self).items() if k != "validation"}
        return {**data, "validation": [v.to_json() for v in self.validation]}

    @classmethod
    def from_json(cls, data: dict) -> History:
        h = cls(**{k: v for k, v in data.items() if k != "validation" and k in cls.__dataclass_fields__})
        h.validation = [ValidationResult.from_json(v) for v in data.get("validation", [])]
        h.epochs = [tuple(e) for e in h.epochs]
        h.checkpoints = [tuple(c) for c in h.checkpoints]
        return h

    def truncate(self, step: int) -> None:
        """Forget what was measured after ``step`` (a resume replays those steps)."""
        keep = sum(1 for s in self.steps if s <= step)
        for name in ("steps", "loss", "average", "lr", "grad_norm"):
            setattr(self, name, getattr(self, name)[:keep])
        self.validation = [v for v in self.validation if v.step <= step]
        self.epochs = [e for e in self.epochs if e[1] <= step]
        self.checkpoints = [c for c in self.checkpoints if c[0] <= step]

    def validation_at(self, step: int) -> ValidationResult | None:
        return next((v for v in self.validation if v.step == step), None)


@dataclass(frozen=True)
class RunInfo:
    """The fixed facts the monitor reports: sizes of the run and where its files go."""

    output_dir: Path
    output_name: str
    total_steps: int
    steps_per_epoch: int
    epochs: int
    save_state: bool
    sample_dir: Path | None = None  # None without --sample_prompts


class Monitor:
    """Console, trackers and pictures of one run (see the module docstring).  Call order: :meth:`open` (after a
    resume, if any) -> :meth:`start_loop` -> ``on_*`` events -> :meth:`finish`, or :meth:`close` on an error."""

    def __init__(self, info: RunInfo, tracker_cfg: TrackerConfig, is_main: bool, config: dict | None = None):
        self.info, self.tracker_cfg, self.is_main, self.config = info, tracker_cfg, is_main, config
        self.history = History()
        self.window = max(1, info.steps_per_epoch)
        self.recent: deque[float] = deque(maxlen=self.window)
        self.tracker = Tracker(None, [])
        self.bar = None
        self.started = time.time()
        self.loop_started, self.loop_first_step = self.started, 0
        self.step_times: deque[tuple[int, float]] = deque(maxlen=RATE_WINDOW + 1)
        self.last_sheet: Path | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    @property
    def run_folder(self) -> Path | None:
        return Path(self.history.run_folder) if self.history.run_folder else None

    def open(self, resumed_step: int | None = None) -> None:
        """Choose the run folder (the resumed run's own, when it lives under the same parent) and open trackers."""
        if not self.is_main:
            return
        fresh = new_run_folder(self.tracker_cfg, self.info.output_dir, self.info.output_name)
        old = self.run_folder
        keep = resumed_step is not None and old is not None and old.parent.resolve() == fresh.parent.resolve()
        folder = old if keep else fresh
        self.history.run_folder = str(folder)
        folder.mkdir(parents=True, exist_ok=True)
        wandb_id = self.history.wandb_id if keep else None
        self.tracker = open_tracker(self.tracker_cfg, folder, resumed_step if keep else None, wandb_id, self.config)
        self.history.wandb_id = self.tracker.wandb_id
        if keep:
            log.info("continuing the run folder %s", folder)

    def start_loop(self, step: int) -> None:
        from tqdm import tqdm

        self.loop_started, self.loop_first_step = time.time(), step
        self.step_times.append((step, self.loop_started))
        self.bar = tqdm(total=self.info.total_steps, initial=step, desc="training", unit="step",
                        disable=not self.is_main, dynamic_ncols=True)  # fmt: skip

    def close(self) -> None:
        """Close the bar and the trackers (also on errors, so an error line never lands inside the bar)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.tracker.close()

    # -- events ------------------------------------------------------------------------------------------------------

    def on_step(self, step: int, loss: float, lr: float, grad_norm: float) -> None:
        self.recent.append(loss)
        average = sum(self.recent) / len(self.recent)
        h = self.history
        for name, value in (("steps", step), ("loss", loss), ("average", average), ("lr", lr),
                            ("grad_norm", grad_norm)):  # fmt: skip
            getattr(h, name).append(value)
        now = time.time()
        self.step_times.append((step, now))
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", avg=f"{average:.4f}", lr=f"{lr:.2e}")
        scalars = {"loss/current": loss, "loss/average": average, "lr": lr, "grad_norm": grad_norm}
        s0, t0 = self.step_times[0]
        if now > t0 and step > s0:
            scalars["steps_per_sec"] = (step - s0) / (now - t0)
        self._scalars(scalars, step)

    def on_epoch(self, epoch: int, step: int) -> None:
        """``epoch`` finished epochs (1-based) at optimizer step ``step``."""
        start = self.history.epochs[-1][1] if self.history.epochs else 0
        losses = [v for s, v in zip(self.history.steps, self.history.loss) if start < s <= step]
        mean = sum(losses) / len(losses) if losses else float("nan")
        self.history.epochs.append((epoch, step, mean))
        self._scalars({"loss/epoch": mean}, step)
        if not self.is_main:
            return
        val = self.history.validation[-1] if self.history.validation else None
        val_text = f", validation {val.mean:.4f} (step {val.step})" if val else ""
        rate = self.rate()
        eta = (self.info.total_steps - step) / rate if rate > 0 else float("nan")
        log.info("epoch %d/%d (step %d): loss %.4f (epoch mean)%s, %.2f steps/s, elapsed %s, ETA %s", epoch,
                 self.info.epochs, step, mean, val_text, rate, format_duration(time.time() - self.started),
                 format_duration(eta) if eta == eta else "?")  # fmt: skip

    def on_validation(self, result: ValidationResult) -> None:
        self.history.validation = [v for v in self.history.validation if v.step != result.step] + [result]
        self._scalars(result.scalars(), result.step)
        if self.is_main:
            log.info("%s", result.describe())

    def on_samples(self, step: int, outputs: Sequence, sheet: Path | None) -> None:
        """Frame strips of one sampling event to the trackers."""
        self.last_sheet = sheet
        if not (self.is_main and self.tracker.enabled):
            return
        for out in outputs:
            self.tracker.image(f"samples/{out.index:02d}", frame_strip(out.frames), step, out.request.prompt)

    def on_save(self, step: int, path: Path) -> None:
        """A LoRA was written (rank 0, before its state directory): record it, refresh ``loss.png`` and
        ``history.json``."""
        self.history.checkpoints = [c for c in self.history.checkpoints if c[1] != str(path)] + [(step, str(path))]
        self.write_files()

    # -- files -------------------------------------------------------------------------------------------------------

    def write_files(self) -> None:
        folder = self.run_folder
        if not self.is_main or folder is None:
            return
        h = self.history
        validation = [(v.step, v.mean) for v in h.validation]
        loss_plot(folder / LOSS_PLOT, f"{self.info.output_name}: loss", h.steps, h.loss, h.average, h.lr,
                  validation, window=self.window)  # fmt: skip
        with atomic_path(folder / HISTORY_FILE) as tmp:
            tmp.write_text(json.dumps(h.to_json(), indent=1))

    def state_files(self) -> dict[str, Callable[[Path], None]]:
        """Extra files of a state directory (see ``kandinsky5.train.state.write_state_dir``)."""
        data = json.dumps(self.history.to_json(), indent=1)
        return {HISTORY_FILE: lambda p: p.write_text(data)}

    def restore(self, state_dir: Path, step: int) -> None:
        """Continue the history saved in ``state_dir`` (absent in states of older versions: start a new one)."""
        path = Path(state_dir) / HISTORY_FILE
        if not path.is_file():
            return
        self.history = History.from_json(json.loads(path.read_text()))
        self.history.truncate(step)
        self.recent.extend(self.history.loss[-self.window :])

    # -- the end -----------------------------------------------------------------------------------------------------

    def rate(self) -> float:
        steps = (self.history.steps[-1] if self.history.steps else 0) - self.loop_first_step
        elapsed = time.time() - self.loop_started
        return steps / elapsed if elapsed > 0 else 0.0

    def finish(self, lora: Path | None) -> list[str]:
        """Close the bar and trackers, write the final pictures and log the summary block; returns its lines."""
        rate = self.rate()
        self.close()
        self.write_files()
        if not self.is_main:
            return []
        lines = summary_lines(self.history, self.info, lora, self.last_sheet, time.time() - self.started, rate,
                              self.tracker_cfg, self.window)  # fmt: skip
        log.info("training finished\n%s", "\n".join(lines))
        return lines

    def _scalars(self, values: dict[str, float], step: int) -> None:
        if self.is_main and self.tracker.enabled:
            self.tracker.scalars(values, step)


def monitor_for(run, steps_per_epoch: int, epochs: int) -> Monitor:
    """The monitor of a ``kandinsky5.train.run.Run``."""
    cfg = run.cfg
    info = RunInfo(cfg.save.output_dir, cfg.save.output_name, run.total_steps, steps_per_epoch, epochs,
                   cfg.save.save_state, cfg.save.output_dir / "sample" if cfg.sample.enabled else None)  # fmt: skip
    return Monitor(info, cfg.tracking, run.ctx.is_main, cfg.tracking.run_config)


def best_checkpoint(history: History) -> tuple[Path, ValidationResult] | None:
    """The existing checkpoint with the lowest validation loss at its step, if any was saved at a validation."""
    found = []
    for step, path in history.checkpoints:
        val = history.validation_at(step)
        if val is not None and Path(path).exists():
            found.append((val.mean, step, Path(path), val))
    return min(found, key=lambda f: (f[0], f[1]))[2:] if found else None


def summary_lines(
    h: History, info: RunInfo, lora: Path | None, sheet: Path | None, wall: float, rate: float,
    tracker_cfg: TrackerConfig, window: int,
) -> list[str]:  # fmt: skip
    """The end-of-run block: files, where to look, and the numbers that say whether the run worked."""
    steps = h.steps[-1] if h.steps else 0
    lines = [f"  steps           {steps} of {info.total_steps}, {rate:.2f} steps/s, wall time {format_duration(wall)}"]
    if lora is not None:
        lines.append(f"  LoRA            {info.output_dir / f'{info.output_name}.safetensors'}")
    if info.save_state:
        lines.append(f"  state           {info.output_dir / f'{info.output_name}-state'}")
    if info.sample_dir is not None:
        lines.append(f"  samples         {info.sample_dir}" + (f" (contact sheet {sheet})" if sheet else ""))
    folder = Path(h.run_folder) if h.run_folder else None
    if folder is not None:
        lines.append(f"  loss curve      {folder / LOSS_PLOT}")
        if "tensorboard" in tracker_cfg.backends:
            lines.append(f"  TensorBoard     {folder}  ->  tensorboard --logdir {shlex.quote(str(folder.parent))}")
    if h.loss:
        lines.append(f"  training loss   {h.loss[0]:.4f} -> {h.loss[-1]:.4f} (moving average over {window} steps: "
                     f"{h.average[0]:.4f} -> {h.average[-1]:.4f})")  # fmt: skip
    if h.validation:
        first, last = h.validation[0], h.validation[-1]
        best = min(h.validation, key=lambda v: (v.mean, v.step))
        lines.append(f"  validation loss {first.mean:.4f} (step {first.step}) -> best {best.mean:.4f} (step "
                     f"{best.step}) -> last {last.mean:.4f} (step {last.step})")  # fmt: skip
        chosen = best_checkpoint(h)
        if chosen is not None:
            path, val = chosen
            lines.append(f"  best checkpoint {path} (validation loss {val.mean:.4f} at step {val.step})")
    return lines
