"""Run configuration of LoRA training: one frozen ``TrainConfig`` (with its network, save and sample parts),
built once from the command line by ``kandinsky5_train_network.py`` and never mutated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kandinsky5.common import UserError, get_logger
from kandinsky5.configs import TaskConfig
from kandinsky5.model import flow
from kandinsky5.train.distributed import DistributedConfig
from kandinsky5.train.insight.tracker import TrackerConfig
from kandinsky5.train.optim import OptimizerConfig, SchedulerConfig

if TYPE_CHECKING:
    from kandinsky5.memory.build import MemoryConfig
    from kandinsky5.memory.compile import CompileConfig
    from kandinsky5.model.dit import AttentionSpec
    from kandinsky5.sampling.magcache import MagCacheConfig


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
    last_n_steps: int | None = None  # keep the step checkpoints of the last N steps (and their states), as musubi
    save_state: bool = False  # write a resumable state directory with every checkpoint and at the end
    format: str | None = None  # None: diffusers for LoRA, comfyui for LoHa / LoKr
    precision: torch.dtype | None = None  # --save_precision (None: the training dtype, fp32)
    last_n_epochs_state: int | None = None  # states rotate apart from the LoRA files (default: as last_n_epochs)
    last_n_steps_state: int | None = None  # (default: as last_n_steps)
    state_on_train_end: bool = False  # a state directory at the end even without save_state

    def kept(self, kind: str, state: bool) -> int | None:
        """How many of the newest ``kind`` ("step" / "epoch") saves rotation keeps (None: all), as musubi:
        ``--save_last_n_epochs`` counts epoch saves; ``--save_last_n_steps`` N is a window of steps, the saves at most
        N steps older than the newest, i.e. N // save_every_n_steps + 1 of them.  ``state``: the state dirs, which
        follow ``--save_last_n_*_state`` when given."""
        if kind == "epoch":
            return (self.last_n_epochs_state if state else None) or self.last_n_epochs
        n = (self.last_n_steps_state if state else None) or self.last_n_steps
        return None if n is None or not self.every_n_steps else n // self.every_n_steps + 1


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
    magcache: MagCacheConfig | None = None  # --magcache: step skipping while sampling
    vae_dtype: torch.dtype | None = None  # --vae_dtype (default: the DiT weight dtype)

    @property
    def enabled(self) -> bool:
        return self.prompts is not None


VALIDATION_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class ValidationConfig:
    """The validation loss (``kandinsky5.train.insight.validation``): which items, when, at which t, which noise."""

    split: float = 0.0  # --validation_split: fraction of the items held out by item-key hash
    every_n_steps: int | None = None  # --validate_every_n_steps
    every_n_epochs: int | None = None  # --validate_every_n_epochs
    timesteps: tuple[float, ...] = VALIDATION_TIMESTEPS  # --validation_timesteps (flow time, 1 = noise)
    seed: int = 0  # --validation_seed: the noise of an item is a function of (seed, item) only

    def __post_init__(self) -> None:
        if not 0.0 <= self.split < 1.0:
            raise UserError(f"--validation_split must be in [0, 1), got {self.split}")
        if not self.timesteps or any(not 0.0 < t <= 1.0 for t in self.timesteps):
            raise UserError(f"--validation_timesteps must be values in (0, 1], got {list(self.timesteps)}")
        if len(set(self.timesteps)) != len(self.timesteps):
            raise UserError(f"--validation_timesteps has repeated values: {list(self.timesteps)}")


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
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    overwrite: bool = False  # --overwrite: an earlier run's files in --output_dir may be replaced
    allow_stale_cache: bool = False  # --allow_stale_cache: caches made with other settings only warn
    tracking: TrackerConfig = field(default_factory=TrackerConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    cuda_allow_tf32: bool = False  # --cuda_allow_tf32: TF32 matmuls and convolutions
    cudnn_benchmark: bool = False  # --cuda_cudnn_benchmark
    scale_weight_norms: float | None = None  # --scale_weight_norms: max-norm of each LoRA delta (train/regularize)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    compile: CompileConfig | None = None  # --compile and its companions (None or disabled: eager)

    @property
    def weight_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision, torch.float32)

    @property
    def autocast(self) -> bool:
        return self.mixed_precision in ("bf16", "fp16")

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run: --max_train_epochs x steps/epoch when given (it wins over --max_train_steps,
        as in musubi), else --max_train_steps, else 1600."""
        if self.max_train_epochs:
            return self.max_train_epochs * steps_per_epoch
        return self.max_train_steps or 1600
