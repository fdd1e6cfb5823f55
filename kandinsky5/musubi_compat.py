"""musubi-tuner habits: the musubi Kandinsky 5 flags we do not offer, the ones fixed to our only value, and the
defaults that differ from musubi's.

Every flag of musubi's four Kandinsky 5 scripts is either one of ours with the same meaning, or registered here by
:func:`add_musubi_args` so that it stops with ONE line saying that it is not offered and what to use instead
(never argparse's bare ``unrecognized arguments``).  ``tests/test_musubi_flags.py`` walks a table of musubi's
parser definitions (``tests/data/musubi_k5_flags.json``) to keep it that way.

* refused flags take any number of values (so ``--flag value`` parses) and are checked by :func:`check_args`
  (``cli.parse_args`` calls it), which also catches them in a ``--config_file``; a ``false`` value there is
  musubi's "off" and is accepted;
* fixed flags accept only the value this project always uses (e.g. ``--block_swap_ring_size 2``);
* always-on flags name behaviour that is always on here (e.g. ``--preserve_distribution_shape``).

:func:`log_default_differences` logs, once at start-up, the effective values of the settings whose default differs
from musubi's (``docs/from_musubi.md`` lists them).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from kandinsky5.common import UserError, get_logger

__all__ = ["add_musubi_args", "check_args", "log_default_differences", "REFUSED", "MUSUBI_DEFAULTS"]

log = get_logger(__name__)

_HF = "no Hugging Face Hub upload during training; run `hf upload REPO OUTPUT_DIR` after "
_NO_MEMMAP = "checkpoints are read through safetensors' own memory map, there is no numpy memmap to turn off; remove it"
_DYNAMO = "accelerate's TorchDynamo plugin is not used; compile the DiT with --compile (and --compile_mode ...)"
_PREVIEW = "no dataset preview (image / console / video); the caching log lists each dataset's buckets and clips"

# our script -> {musubi flag: what to do instead}
REFUSED: dict[str, dict[str, str]] = {
    "train": {
        "--split_attn": "musubi ignores it for Kandinsky 5 as well (one masked attention call per batch here); "
        "remove it",
        "--dynamo_backend": _DYNAMO,
        "--dynamo_mode": _DYNAMO,
        "--dynamo_fullgraph": _DYNAMO,
        "--dynamo_dynamic": _DYNAMO,
        "--img_in_txt_in_offloading": "a HunyuanVideo option (musubi ignores it for Kandinsky 5); remove it",
        "--disable_numpy_memmap": _NO_MEMMAP,
        "--guidance_scale": "HunyuanVideo's embedded guidance; Kandinsky 5 trains without it (musubi ignores it "
        "too); remove it (the CFG of samples is the prompt line's --g)",
        "--num_timestep_buckets": "no stratified timestep buckets; use a --timestep_sampling mode with "
        "--min_timestep/--max_timestep (exact inverse-CDF draws), see docs/timestep_sampling.md",
        "--override_dit": "the architecture comes from --task; for another one add a task to kandinsky5/configs.py",
        "--no_vae_load": "musubi ignores it too: the trainer loads the VAE only to sample (--sample_prompts); "
        "remove it",
        "--huggingface_repo_id": _HF + "training",
        "--huggingface_repo_type": _HF + "training",
        "--huggingface_path_in_repo": _HF + "training",
        "--huggingface_token": _HF + "training",
        "--huggingface_repo_visibility": _HF + "training",
        "--save_state_to_huggingface": _HF + "training (state directories included)",
        "--async_upload": _HF + "training",
        "--resume_from_huggingface": "no resume from the Hugging Face Hub; download the state directory first "
        "(`hf download REPO --local-dir DIR`) and pass --resume DIR",
    },
    "generate": {"--disable_numpy_memmap": _NO_MEMMAP},
    "cache_latents": {
        "--debug_mode": _PREVIEW,
        "--console_width": _PREVIEW,
        "--console_back": _PREVIEW,
        "--console_num_images": _PREVIEW,
    },
    "cache_text": {
        "--num_workers": "captions are read in the main process (small text files, no decoding); remove it",
    },
}

# our script -> {musubi flag: (type, the only value we use, why)}
FIXED: dict[str, dict[str, tuple[type, object, str]]] = {
    "train": {
        "--block_swap_ring_size": (int, 2, "block swap always streams through 2 GPU slots (compute + prefetch)"),
    },
    "cache_text": {
        "--qwen_max_length": (
            int,
            256,
            "every task keeps 256 Qwen tokens, as sampling and inference do (musubi's "
            "512 default makes caches that do not match them)",
        ),  # fmt: skip
        "--clip_max_length": (int, 77, "CLIP always uses its 77 tokens"),
    },
}

# our script -> {musubi flag: what is always on here}
ALWAYS_ON: dict[str, dict[str, str]] = {
    "train": {
        "--preserve_distribution_shape": "accepted for musubi compatibility; always on here: --min_timestep / "
        "--max_timestep truncate the mode's own distribution (exact inverse-CDF draws, no rescaling)",
        "--block_swap_h2d_only": "accepted for musubi compatibility; always on here: block swap only copies "
        "host-to-device (frozen weights never go back), with or without --gradient_checkpointing",
    },
}

# our script -> {flag dest: (musubi's default, how musubi behaves)}: the defaults that differ
MUSUBI_DEFAULTS: dict[str, dict[str, tuple[object, str]]] = {
    "train": {
        "timestep_sampling": ("sigma", "sigma"),
        "discrete_flow_shift": (1.0, "1.0"),
        "learning_rate": (2e-6, "2e-06"),
        "mixed_precision": ("no", "accelerate's setting, 'no' without one"),
        "max_data_loader_n_workers": (8, "8"),
        "save_format": ("musubi", "its own lora_unet_* keys"),
        "optimizer_type": ("", "'' (no default optimizer)"),
    },
}


class _Refused(argparse.Action):
    """A musubi flag we do not offer: swallows its values; :func:`check_args` turns it into the error."""

    def __init__(self, option_strings, dest, message: str, **kwargs):
        self.message = message
        super().__init__(option_strings, dest, nargs="*", default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


class _Fixed(argparse.Action):
    """A musubi flag whose only valid value here is ``self.value``."""

    def __init__(self, option_strings, dest, value: object, reason: str, **kwargs):
        self.value, self.reason = value, reason
        super().__init__(option_strings, dest, default=None, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


def add_musubi_args(parser: argparse.ArgumentParser, script: str) -> None:
    """Register musubi's flags of ``script`` ("train", "generate", "cache_latents", "cache_text") that are
    refused, fixed or always on here, in one help group."""
    g = parser.add_argument_group("musubi-tuner flags (accepted only where they mean the same here)")
    for flag, text in ALWAYS_ON.get(script, {}).items():
        g.add_argument(flag, action="store_true", help=f"{text} (default: on)")
    for flag, (kind, value, reason) in FIXED.get(script, {}).items():
        g.add_argument(flag, action=_Fixed, type=kind, value=value, reason=reason,
                       help=f"only {value} is accepted: {reason} (default: {value})")  # fmt: skip
    for flag, message in REFUSED.get(script, {}).items():
        g.add_argument(flag, action=_Refused, message=message, help=f"not offered here: {message}")


def _given(value: object) -> bool:
    return value is not None and value is not False  # a config file's `flag = false` is musubi's "off"


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line UserError for a refused musubi flag or a fixed one with another value (command line or file)."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if isinstance(action, _Refused) and _given(value):
            raise UserError(f"{action.option_strings[0]} (a musubi-tuner flag) is not offered here: {action.message}")
        if isinstance(action, _Fixed) and value is not None and value != action.value:
            raise UserError(
                f"{action.option_strings[0]} {value}: only {action.value} is supported ({action.reason}); "
                f"remove it or pass {action.value}"
            )


def log_default_differences(script: str, effective: Mapping[str, object]) -> None:
    """Log once the effective values of the settings whose defaults differ from musubi's (those that differ)."""
    table = MUSUBI_DEFAULTS.get(script, {})
    parts = [
        f"{key} {value} (musubi: {table[key][1]})"
        for key, value in effective.items()
        if key in table and value != table[key][0]
    ]
    if parts:
        log.info("settings that differ from musubi-tuner's defaults (docs/from_musubi.md): %s", "; ".join(parts))
