"""Run configuration of LoRA training: one frozen ``TrainConfig`` (with its network, save and sample parts),
built once from the command line by ``kandinsky5_train_network.py`` and never mutated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kandinsky5.common import get_logger
from kandinsky5.configs import TaskConfig
from kandinsky5.model import flow
from kandinsky5.train.optim import OptimizerConfig, SchedulerConfig

if TYPE_CHECKING:
    from kandinsky5.memory.build import MemoryConfig
    from kandinsky5.model.dit import AttentionSpec


log = get_logger(__name__)


I2V_MODES = ("first", "first_last")
SAVE_FORMATS = ("comfyui", "diffusers", "musubi")


@dataclass(frozen=True)
class NetworkConfig:
    module: str = "networks.lora_kandinsky"  # --network_module, imported by name
    dim: int = 4  # --network_dim (rank)
    alpha: float = 1.0  # --network_alpha (scale = alpha / rank)
    dropout: float | None = None  # --network_dropout (rank-activation dropout)
    args: Mapping[str, Any] = field(default_factory=dict)  # --network_args, literal-parsed
    weights: Path | None = None  # --network_weights: start from this LoRA
    dim_from_weights: bool = False  # --dim_from_weights: modules, kinds, ranks and alphas from --network_weights
    base_weights: tuple[Path, ...] = ()  # --base_weights: merged into the DiT before training
    base_multipliers: tuple[float, ...] = ()  # --base_weights_multiplier, one per base file


@dataclass(frozen=True)
class SaveConfig:
    output_dir: Path
    output_name: str
    every_n_epochs: int | None = None
    every_n_steps: int | None = None
    last_n_epochs: int | None = None  # keep only the newest N epoch checkpoints (and their states)
    last_n_steps: int | None = None  # keep only the newest N step checkpoints (and their states)
    save_state: bool = False  # write a resumable state directory with every checkpoint and at the end
    format: str | None = None  # None: diffusers for LoRA, comfyui for LoHa / LoKr
    precision: torch.dtype | None = None  # --save_precision (None: the training dtype, fp32)


@dataclass(frozen=True)
class MetadataConfig:
    """What the saved adapter files say about the run (--no_metadata, --trigger_word, --metadata_*)."""

    enabled: bool = True  # False (--no_metadata): only the minimum kohya keys, modelspec and the trigger word
    trigger_word: str | None = None  # stored as the official ``trigger`` key
    training_comment: str | None = None
    title: str | None = None  # modelspec.title (default: --output_name)
    author: str | None = None
    description: str | None = None
    license: str | None = None
    tags: str | None = None
    resolution: str | None = None  # "W,H" (default: the task's resolution)
    architecture: str | None = None  # overrides modelspec.architecture
    full_paths: bool = False  # ss_datasets with absolute paths instead of directory names


@dataclass(frozen=True)
class SampleConfig:
    prompts: Path | None = None
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    at_first: bool = False
    text_encoder_qwen: str | None = None
    text_encoder_clip: str | None = None
    vae: str | None = None

    @property
    def enabled(self) -> bool:
        return self.prompts is not None


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; built once from the command line, never mutated."""

    task: TaskConfig  # with --scheduler_scale applied (used by sampling, stored in the LoRA metadata)
    dit_path: Path
    dataset_config: Path
    attention: AttentionSpec
    memory: MemoryConfig
    mixed_precision: str  # "bf16" (DiT weights bf16 + autocast) | "no" (fp32)
    seed: int | None
    max_train_steps: int | None
    max_train_epochs: int | None
    gradient_accumulation_steps: int
    max_grad_norm: float  # 0 disables clipping (the norm is still measured and logged)
    i2v_mode: str
    timesteps: flow.TimestepConfig
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig
    network: NetworkConfig
    save: SaveConfig
    sample: SampleConfig
    num_workers: int = 1
    persistent_workers: bool = False
    resume: Path | None = None
    logging_dir: Path | None = None
    metadata: MetadataConfig = field(default_factory=MetadataConfig)

    @property
    def weight_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision, torch.float32)

    @property
    def autocast(self) -> bool:
        return self.mixed_precision in ("bf16", "fp16")

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run: epochs x steps/epoch, --max_train_steps, the smaller if both; default 1600."""
        limits = [n for n in (self.max_train_steps,) if n]
        if self.max_train_epochs:
            limits.append(self.max_train_epochs * steps_per_epoch)
        return min(limits) if limits else 1600
