"""musubi-tuner's own Kandinsky 5 LoRA training step, run from a checkout, for side-by-side benchmarks.

musubi-tuner is not on the package registry: point ``--musubi PATH`` (or ``MUSUBI_TUNER_PATH``) at a checkout of
kohya-ss/musubi-tuner (the directory holding ``src/musubi_tuner``).  Nothing of it is copied into this project; it
is imported from that path at run time.

What runs is musubi's code end to end: its parser's defaults (``setup_parser_common`` + ``kandinsky5_setup_parser``
with ``--override_dit`` giving the benchmark's DiT shape), ``Kandinsky5NetworkTrainer.load_transformer`` (its dtype
handling) on a safetensors file holding *our* random weights (the key names are the official ones on both sides),
``networks.lora_kandinsky.create_arch_network`` + ``apply_to`` (its LoRA), and per step ``process_batch`` (its
timestep sampling, its ``call_dit`` -- one DiT call per sample, caption repeated per latent frame -- and its loss),
backward, ``clip_grad_norm_`` on ``get_trainable_params()``, ``torch.optim.AdamW``, ``zero_grad`` -- the body of
musubi's training loop.  Batch layout as musubi's dataset gives it: latents (B, C, F, H, W), a list of per-sample
caption embeddings (L_i, D_text), pooled (B, D_pooled).

Import-time-only dependencies that are not installed here (musubi imports ``cv2``, ``torchvision``, ``voluptuous``
at module level for dataset and image code that this step never calls) are replaced by empty stub modules; the
list is reported.  The Accelerator is a minimal stand-in: ``device`` and ``autocast()`` (= ``torch.autocast`` in
bf16), which is what accelerate's gives on a single CPU process.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["checkout_path", "MusubiStep"]

_IMPORT_ONLY = ("cv2", "torchvision", "voluptuous")


def checkout_path(flag: str | None) -> Path | None:
    """The musubi-tuner checkout from ``--musubi`` or ``MUSUBI_TUNER_PATH`` (None: skip the comparison)."""
    raw = flag or os.environ.get("MUSUBI_TUNER_PATH")
    if not raw:
        return None
    root = Path(raw)
    src = root / "src" if (root / "src" / "musubi_tuner").is_dir() else root
    if not (src / "musubi_tuner" / "kandinsky5_train_network.py").is_file():
        raise SystemExit(f"--musubi {raw}: no src/musubi_tuner/kandinsky5_train_network.py there")
    return src


class _Stub(types.ModuleType):
    __path__: list[str] = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        return _Stub("call")


class _StubFinder:
    """Resolves only the listed top-level packages, and only when nothing else on sys.path provides them."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        return _Stub(spec.name)

    def exec_module(self, module):
        pass


def _import_musubi(src: Path) -> tuple[types.ModuleType, list[str]]:
    import transformers.models.auto.processing_auto  # noqa: F401 -- resolve its optional imports before stubbing

    missing = [n for n in _IMPORT_ONLY if importlib.util.find_spec(n) is None]
    if missing:
        sys.meta_path.append(_StubFinder(missing))
    sys.path.insert(0, str(src))
    import logging

    level = logging.root.level
    module = importlib.import_module("musubi_tuner.kandinsky5_train_network")
    logging.root.setLevel(max(level, logging.WARNING))  # musubi's basicConfig(INFO) would flood the table
    for name in ("musubi_tuner", "musubi_tuner.networks.lora", "musubi_tuner.kandinsky5_train_network"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return module, missing


@dataclass
class _Accelerator:
    device: torch.device

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


class MusubiStep:
    """One musubi training step on the benchmark's DiT shape and batch; ``step()`` returns (fwd+bwd s, total s)."""

    def __init__(self, src: Path, cfg, state_dict: dict, rank: int, workdir: Path, device: torch.device):
        from safetensors.torch import save_file

        k5, self.stubbed = _import_musubi(src)
        parser = k5.kandinsky5_setup_parser(k5.setup_parser_common())
        dit_path = workdir / "musubi_dit.safetensors"
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state_dict.items()}, str(dit_path))
        override = dict(
            in_visual_dim=cfg.in_visual_dim, in_text_dim=cfg.in_text_dim, in_text_dim2=cfg.in_text_dim2,
            time_dim=cfg.time_dim, out_visual_dim=cfg.out_visual_dim, patch_size=list(cfg.patch_size),
            model_dim=cfg.model_dim, ff_dim=cfg.ff_dim, num_text_blocks=cfg.num_text_blocks,
            num_visual_blocks=cfg.num_visual_blocks, axes_dims=list(cfg.axes_dims), visual_cond=cfg.visual_cond,
        )  # fmt: skip
        argv = ["--task", "k5-lite-t2v-5s-sd", "--dit", str(dit_path), "--dataset_config", "unused.toml",
                "--mixed_precision", "bf16", "--network_module", "networks.lora_kandinsky",
                "--network_dim", str(rank), "--network_alpha", str(rank), "--sdpa",
                "--override_dit", json.dumps(override)]  # fmt: skip
        self.args = args = parser.parse_args(argv)
        for name in ("fp8_base", "fp8_scaled", "fp8_fast"):
            setattr(args, name, getattr(args, name, False))
        args.blocks_to_swap = getattr(args, "blocks_to_swap", 0) or 0
        self.trainer = trainer = k5.Kandinsky5NetworkTrainer()
        trainer.handle_model_specific_args(args)
        self.accelerator = _Accelerator(device)
        self.dit = trainer.load_transformer(self.accelerator, args, str(dit_path), "sdpa", False, "cpu", torch.bfloat16)
        self.dit.requires_grad_(False)
        self.dit.train()
        lora_kandinsky = importlib.import_module("musubi_tuner.networks.lora_kandinsky")
        torch.manual_seed(0)
        self.network = lora_kandinsky.create_arch_network(1.0, rank, float(rank), None, [], self.dit)
        self.network.apply_to(None, self.dit, apply_text_encoder=False, apply_unet=True)
        self.network.to(device)
        self.network.train()
        self.params = [p for p in self.network.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        scheduling = importlib.import_module("musubi_tuner.modules.scheduling_flow_match_discrete")
        self.noise_scheduler = scheduling.FlowMatchDiscreteScheduler(
            shift=args.discrete_flow_shift, reverse=True, solver="euler"
        )
        self.device = device

    def lora_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    def batch(self, latents: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> dict:
        """Our (B, T, H, W, C) latents and padded (B, L, D) text -> musubi's layout (per-sample unpadded text)."""
        return {
            "latents": latents.permute(0, 4, 1, 2, 3).contiguous(),
            "text_embeds": [text[i, : int(mask[i].sum())] for i in range(text.shape[0])],
            "pooled_embed": pooled,
            "timesteps": None,
        }

    def loss(self, batch: dict) -> torch.Tensor:
        latents = batch["latents"].to(self.device)
        noise = torch.randn_like(latents)
        loss, _ = self.trainer.process_batch(
            self.args, self.accelerator, self.dit, self.network, batch, latents, noise, self.noise_scheduler,
            torch.bfloat16, torch.float32, None, 0,
        )  # fmt: skip
        return loss

    def finish(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.args.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
