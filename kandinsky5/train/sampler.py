"""Sampling during training (rank 0): the ``--sample_prompts`` file is parsed and checked at start-up, the
prompts are encoded once, and each sampling event denoises with the current LoRA and writes mp4/png files plus one
contact sheet PNG (rows = prompts, columns = frames; ``kandinsky5.train.insight.report.contact_sheet``).

Memory order (a 24 GB card must never hold Qwen2.5-VL-7B next to the DiT): :meth:`TrainingSampler.prepare` runs at
start-up, *before the DiT is built*: it encodes every prompt and negative prompt (CPU copies kept), frees the text
encoders, and encodes the ``--i`` / ``--l`` images with the VAE.  Between sampling events the VAE waits in CPU
memory; it is on the GPU only while a sampling event decodes.

Layouts: decoded frames ``(F, H, W, 3)`` uint8 (``SampleOutput.frames``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kandinsky5.common import UserError, get_logger
from kandinsky5.configs import TaskConfig
from kandinsky5.sampling import pipeline
from kandinsky5.sampling.prompts import prepend_trigger, read_prompt_file
from kandinsky5.train.config import TrainConfig
from kandinsky5.train.state import (
    capture_rng,
    restore_rng,
)

if TYPE_CHECKING:
    pass


log = get_logger(__name__)


def sample_requests(task: TaskConfig, prompts: Path, trigger: str | None = None) -> list[pipeline.GenerationRequest]:
    """Parse and check the ``--sample_prompts`` file (no model needed); errors name the flag, file and line.

    ``trigger`` (--trigger_word) is prepended to each prompt as the official pipeline and our generator will do
    with the saved file (prompts that already start with it are left alone).

    The trainer calls this at start-up, before the DiT loads, so a bad prompt file fails in seconds, not at the
    first sample after hours of training.
    """
    if not Path(prompts).is_file():
        raise UserError(f"--sample_prompts {prompts} does not exist")
    try:
        lines = read_prompt_file(prompts, "--sample_prompts")
        if trigger:  # as the official pipeline and our generator will do with the saved file
            lines = [dataclasses.replace(line, prompt=prepend_trigger(trigger, line.prompt)) for line in lines]
        return [pipeline.request_from_line(task, line) for line in lines]
    except UserError as exc:  # the message names file:line
        message = str(exc)
        raise UserError(message if message.startswith("--sample_prompts") else f"--sample_prompts {message}") from None


@dataclass(frozen=True)
class SampleOutput:
    """One sample of a sampling event: the request, its frames and the file written."""

    index: int  # position in the prompt file
    request: pipeline.GenerationRequest
    frames: np.ndarray  # (F, H, W, 3) uint8
    path: Path

    def label(self, step: int) -> str:
        return f"#{self.index}  step {step}  seed {self.request.spec.seed}  {self.request.prompt}"


class TrainingSampler:
    """Prompts from ``--sample_prompts`` encoded once (text encoders then freed), images encoded once; each call
    denoises with the current LoRA, decodes with the VAE and writes ``<output_dir>/sample/<name>_<step>_<i>.mp4``.

    Global RNG states are restored afterwards, so sampling never changes the training trajectory.  Under --fsdp every
    rank runs the sampler (each DiT forward all-gathers the shards of all ranks) and only the one with ``writes``
    writes files.
    """

    def __init__(
        self, cfg: TrainConfig, device: torch.device, requests: list[pipeline.GenerationRequest], writes: bool = True
    ):
        self.cfg, self.task, self.requests, self.writes = cfg, cfg.task, requests, writes
        self.out_dir = cfg.save.output_dir / "sample"
        s = cfg.sample
        self.pipeline = pipeline.Kandinsky5Pipeline(
            self.task,
            text_encoder_qwen=s.text_encoder_qwen,
            text_encoder_clip=s.text_encoder_clip,
            vae_path=s.vae,
            device=device,
            dtype=cfg.weight_dtype,
            magcache=s.magcache,
            vae_dtype=s.vae_dtype,
        )
        self.prepared: list[pipeline.PreparedRequest] = []

    def prepare(self) -> None:
        """Encode every prompt and image now, then free the text encoders and park the VAE in CPU memory.  The
        trainer calls this before it builds the DiT, so the DiT is never resident together with Qwen."""
        self.prepared = [self.pipeline.prepare(r) for r in self.requests]
        self.pipeline.encode_prompts(p.request for p in self.prepared)
        self.pipeline.release_text_encoder()
        self._park_vae()
        log.info("sampling: %d prompt(s) encoded once, text encoders freed; videos go to %s", len(self.prepared),
                 self.out_dir)  # fmt: skip

    def _park_vae(self) -> None:
        if self.pipeline.vae is not None and self.pipeline.device.type != "cpu":
            self.pipeline.vae.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def sheet_path(self, step: int) -> Path:
        return self.out_dir / f"{self.cfg.save.output_name}_{step:06d}_sheet.png"

    def __call__(
        self, dit: torch.nn.Module, network: torch.nn.Module, step: int, generator: torch.Generator
    ) -> list[SampleOutput]:
        """Write this event's samples and its contact sheet; returns the samples (for the trackers)."""
        from kandinsky5.train.insight.report import SheetRow, contact_sheet

        if not self.prepared:
            self.prepare()
        rng = capture_rng(generator)
        was_training = network.training
        network.eval()
        if self.pipeline.vae is not None:
            self.pipeline.vae.to(self.pipeline.device)
        try:
            outputs = self._generate(dit, step)
        finally:
            network.train(was_training)
            restore_rng(rng, generator)
            self._park_vae()
        if not self.writes:
            return outputs
        contact_sheet([SheetRow(o.label(step), o.frames) for o in outputs], self.sheet_path(step))
        log.info("step %d: wrote %d sample(s) and the contact sheet %s", step, len(outputs), self.sheet_path(step))
        return outputs

    def _generate(self, dit: torch.nn.Module, step: int) -> list[SampleOutput]:
        from kandinsky5.sampling.video_io import write_image, write_video

        offload = self.cfg.memory.offload_during_sampling
        results = self.pipeline.generate_iter(dit, self.prepared, offload_dit=offload, progress=False)
        outputs = []
        for i, result in enumerate(results):
            if not self.writes:
                continue
            stem = self.out_dir / f"{self.cfg.save.output_name}_{step:06d}_{i:02d}_{result.request.spec.seed}"
            meta = {**result.metadata, "training_step": str(step)}
            if result.frames.shape[0] == 1:
                path = write_image(stem.with_suffix(".png"), result.frames[0], meta, overwrite=True)
            else:
                path = write_video(stem.with_suffix(".mp4"), result.frames, self.task.fps, meta, overwrite=True)
            outputs.append(SampleOutput(i, result.request, result.frames, Path(path)))
        return outputs
