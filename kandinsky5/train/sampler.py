"""Sampling during training (rank 0): the ``--sample_prompts`` file is parsed and checked at start-up, the
prompts are encoded once, and each sampling event denoises with the current LoRA and writes mp4/png files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

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
    requests = []
    for line in read_prompt_file(prompts):
        if trigger:
            line = dataclasses.replace(line, prompt=prepend_trigger(trigger, line.prompt))
        try:
            requests.append(pipeline.request_from_line(task, line))
        except UserError as exc:
            raise UserError(f"--sample_prompts {prompts}: prompt {line.prompt[:40]!r}: {exc}") from None
    return requests


class TrainingSampler:
    """Prompts from ``--sample_prompts`` encoded once (text encoders then freed), images encoded once; each call
    denoises with the current LoRA, decodes with the VAE and writes ``<output_dir>/sample/<name>_<step>_<i>.mp4``.

    Global RNG states are restored afterwards, so sampling never changes the training trajectory.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device, requests: list[pipeline.GenerationRequest]):
        self.cfg, self.task, self.requests = cfg, cfg.task, requests
        self.out_dir = cfg.save.output_dir / "sample"
        s = cfg.sample
        self.pipeline = pipeline.Kandinsky5Pipeline(
            self.task,
            text_encoder_qwen=s.text_encoder_qwen,
            text_encoder_clip=s.text_encoder_clip,
            vae_path=s.vae,
            device=device,
            dtype=cfg.weight_dtype,
        )
        self.prepared: list[pipeline.PreparedRequest] = []

    def prepare(self) -> None:
        """Encode every prompt and image now (text encoders are released afterwards)."""
        self.prepared = [self.pipeline.prepare(r) for r in self.requests]
        self.pipeline.encode_prompts(p.request for p in self.prepared)
        self.pipeline.release_text_encoder()
        log.info("sampling: %d prompt(s) encoded once; videos go to %s", len(self.prepared), self.out_dir)

    def __call__(self, dit: torch.nn.Module, network: torch.nn.Module, step: int, generator: torch.Generator):
        from kandinsky5.sampling.video_io import write_image, write_video

        if not self.prepared:
            self.prepare()
        rng = capture_rng(generator)
        was_training = network.training
        network.eval()
        try:
            offload = self.cfg.memory.offload_during_sampling
            results = self.pipeline.generate_iter(dit, self.prepared, offload_dit=offload, progress=False)
            for i, result in enumerate(results):
                stem = self.out_dir / f"{self.cfg.save.output_name}_{step:06d}_{i:02d}_{result.request.spec.seed}"
                meta = {**result.metadata, "training_step": str(step)}
                if result.frames.shape[0] == 1:
                    write_image(stem.with_suffix(".png"), result.frames[0], meta, overwrite=True)
                else:
                    write_video(stem.with_suffix(".mp4"), result.frames, self.task.fps, meta, overwrite=True)
        finally:
            network.train(was_training)
            restore_rng(rng, generator)
        log.info("step %d: wrote %d sample(s) to %s", step, len(self.prepared), self.out_dir)
