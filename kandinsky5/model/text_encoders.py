"""Text conditioning for Kandinsky 5: Qwen2.5-VL token states + CLIP pooled vector (``architecture.md`` section 3).

Layouts
-------
========================  ==========================  ==========================================================
tensor                    shape                       meaning
========================  ==========================  ==========================================================
``TextEmbeds.embeds``     (B, L, D_qwen) float        Qwen2.5-VL last hidden state (post final RMSNorm) of the
                                                      prompt tokens, template prefix dropped, right-padded with zeros to
                                                      the longest prompt of the batch (L <= max_length)
``TextEmbeds.mask``       (B, L) bool                 True = real token; always a prefix of each row
``TextEmbeds.pooled``     (B, D_clip) float           CLIP ``pooler_output`` (final-LN state at the EOS token)
========================  ==========================  ==========================================================

Qwen: each prompt is put into one of the official templates (``QWEN_TEMPLATES``, wording verbatim including the
authors' typos), tokenised with ``max_length = crop_start + max_length`` and truncation, right padding, and run
through the language model with its attention mask.  The first ``crop_start`` positions (the system turn plus
``<|im_start|>user\\n``) are dropped; the trailing ``<|im_end|>`` stays as a conditioning token.  ``crop_start`` is
*computed* from the tokenizer (tokens of the template text before ``{}``), so tiny offline tokenizers work; with
the real Qwen tokenizer it equals 129 / 132 / 41 (video / image2video / image).

Only the language model of Qwen2.5-VL is kept after loading (vision tower and LM head are dropped): text-only
inputs never reach them, and the text model's default positions (0..L-1 on all three M-RoPE axes) are the ones the
full model uses for text.  Because the LM is causal and padding is on the right, a prompt gets exactly the same
rows whether it is encoded alone or in a batch.

CLIP: the raw prompt (no template), ``max_length=77``, ``padding="max_length"``, truncation, special tokens on.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from kandinsky5.common import UserError, get_logger, parse_dtype, quiet_hf_progress
from kandinsky5.files import read_safetensors_header

__all__ = ["QWEN_TEMPLATES", "REAL_CROP_START", "TextEmbeds", "TextEncoder"]

log = get_logger(__name__)

_VIDEO_HEAD = (
    "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the objects."
)
_VIDEO_TAIL = (
    "Describe the dynamism of the video and presented actions.",
    "Name the visual style of the video: whether it is a professional footage, user generated content, some kind of "
    "animation, video game or scren content.",
    "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
    "Pay attention to the order of key actions shown in the scene.<|im_end|>",
    "<|im_start|>user\n{}<|im_end|>",
)

QWEN_TEMPLATES: dict[str, str] = {
    "video": "\n".join(
        (
            "<|im_start|>system\nYou are a promt engineer. Describe the video in detail.",
            _VIDEO_HEAD,
            "Describe the location of the video, main characters or objects and their action.",
            *_VIDEO_TAIL,
        )
    ),
    "image2video": "\n".join(
        (
            "<|im_start|>system\nYou are a promt engineer. Your task is to create a highly detailed and effective "
            "video description based on a provided input image.",
            _VIDEO_HEAD,
            "Describe main characters actions.",
            *_VIDEO_TAIL,
        )
    ),
    "image": "\n".join(
        (
            "<|im_start|>system\nYou are a promt engineer. Describe the image by detailing the color, shape, size, "
            "texture, quantity, text, spatial relationships of the objects and background:<|im_end|>",
            "<|im_start|>user\n{}<|im_end|>",
        )
    ),
}

# crop_start of the official code, valid for the real Qwen2.5-VL tokenizer only (architecture.md 3.1).
REAL_CROP_START: dict[str, int] = {"video": 129, "image2video": 132, "image": 41}

CLIP_MAX_LENGTH = 77
_REAL_QWEN_VOCAB = 150_000  # the real Qwen2 tokenizers have ~151.6k tokens; tiny test tokenizers far fewer
_QWEN_TYPES = ("qwen2_5_vl",)
_CLIP_TYPES = ("clip_text_model", "clip")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


# --------------------------------------------------------------------------------------------------------------
# Output container
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TextEmbeds:
    """A batch of encoded prompts; see the module docstring for the layouts."""

    embeds: torch.Tensor  # (B, L, D_qwen)
    mask: torch.Tensor  # (B, L) bool
    pooled: torch.Tensor  # (B, D_clip)

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) int64 number of real tokens per prompt."""
        return self.mask.sum(dim=1)

    def to(self, device=None, dtype=None) -> TextEmbeds:
        """Move / cast the float tensors; the mask only moves (it stays bool)."""
        return TextEmbeds(
            self.embeds.to(device=device, dtype=dtype),
            self.mask.to(device=device),
            self.pooled.to(device=device, dtype=dtype),
        )

    def select(self, index) -> TextEmbeds:
        """Rows subset (int, slice, list or tensor index), re-trimmed to the longest remaining prompt."""
        if isinstance(index, int):
            index = [index]
        mask = self.mask[index]
        width = int(mask.sum(dim=1).max()) if mask.shape[0] else 0
        return TextEmbeds(self.embeds[index][:, :width], mask[:, :width], self.pooled[index])

    def unpadded(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt ``i`` without pads: ((L_i, D_qwen) embeds, (D_clip,) pooled)."""
        length = int(self.mask[i].sum())
        return self.embeds[i, :length], self.pooled[i]

    @staticmethod
    def pad_stack(items: list[tuple[torch.Tensor, torch.Tensor]]) -> TextEmbeds:
        """Inverse of ``unpadded``: right-pad [((L_i, D), (Dc,)), ...] with zeros into one batch."""
        if not items:
            raise ValueError("pad_stack needs at least one (embeds, pooled) pair")
        width = max(e.shape[0] for e, _ in items)
        first = items[0][0]
        embeds = first.new_zeros((len(items), width, first.shape[-1]))
        mask = torch.zeros((len(items), width), dtype=torch.bool, device=first.device)
        for row, (e, _) in enumerate(items):
            embeds[row, : e.shape[0]] = e
            mask[row, : e.shape[0]] = True
        pooled = torch.stack([p for _, p in items])
        return TextEmbeds(embeds, mask, pooled)


# --------------------------------------------------------------------------------------------------------------
# Loading helpers
# --------------------------------------------------------------------------------------------------------------


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not name.startswith(".")


def _check_local_dir(path: str, what: str, model_types: tuple[str, ...]) -> None:
    """One-line UserError for a missing dir, a missing config.json or a config of the wrong model type."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{what}: {path} is not a directory; pass a local Hugging Face snapshot directory")
    config = root / "config.json"
    if not config.is_file():
        raise UserError(f"{what}: {path} has no config.json; pass the snapshot directory that contains it")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise UserError(f"{what}: cannot read {config}: {exc}") from None
    if model_type not in model_types:
        raise UserError(
            f"{what}: {config} says model_type={model_type!r}, expected {' or '.join(model_types)}; wrong directory?"
        )
    for weights in sorted(root.glob("*.safetensors")):  # a truncated shard is one line now, not a loader traceback
        read_safetensors_header(weights, what)


def _resolve(path: str, what: str, model_types: tuple[str, ...]) -> None:
    """Local dirs are validated; anything else that looks like a hub id is left to from_pretrained."""
    if os.path.exists(path) or not _looks_like_hub_id(path):
        _check_local_dir(path, what, model_types)


def _from_pretrained(loader, name: str, what: str, **kwargs):
    """``loader(name)`` with every loading failure turned into one readable line."""
    quiet_hf_progress()  # no "Loading weights" bar per model (the hub's download bars stay)
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if os.path.isdir(name):
            raise UserError(f"{what}: could not load the snapshot in {name}: {first}") from None
        raise UserError(
            f"{what}: {name!r} is not a local directory, and loading it as a hub id failed (no network, or not in "
            f"the local cache?): {first} -- pass a local snapshot directory instead"
        ) from None


def _strict(loaded, path: str, what: str, ignore: tuple[str, ...] = ()):
    """Unpack ``(model, loading_info)``; weights the snapshot lacks (transformers would random-init them) are errors."""
    model, info = loaded
    missing = sorted(k for k in info.get("missing_keys", ()) if not any(part in k for part in ignore))
    if missing:
        raise UserError(f"{what}: {path} lacks {len(missing)} weights (e.g. {', '.join(missing[:3])}); wrong snapshot?")
    return model


def _tokenizer_dir(model_dir: str) -> str:
    """The model dir itself, or a diffusers-layout sibling (``text_encoder_2`` -> ``tokenizer_2``)."""
    root = Path(model_dir)
    if not root.is_dir() or any((root / f).is_file() for f in _TOKENIZER_FILES):
        return model_dir
    sibling = root.parent / root.name.replace("text_encoder", "tokenizer")
    return str(sibling) if sibling.is_dir() else model_dir


def _display_name(path: str) -> str:
    """Stable short name: basename, or ``repo@hash8`` for a hub cache ``.../models--org--name/snapshots/<hash>``."""
    p = Path(path)
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return f"{p.parent.parent.name[len('models--') :].replace('--', '/')}@{p.name[:8]}"
    return p.name if os.path.exists(path) else path


def _load_qwen(path: str, device, dtype: torch.dtype, qwen_4bit: bool):
    """Qwen2.5-VL language model (vision tower and LM head dropped) + its tokenizer."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    what = "Qwen2.5-VL text encoder"
    kwargs = {"dtype": dtype, "output_loading_info": True}
    if qwen_4bit:
        kwargs.update(quantization_config=_bnb_4bit(dtype), device_map={"": str(device)})
    loaded = _from_pretrained(Qwen2_5_VLForConditionalGeneration.from_pretrained, path, what, **kwargs)
    full = _strict(loaded, path, what, ignore=("visual", "lm_head"))  # both are dropped below
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, _tokenizer_dir(path), f"{what} tokenizer")
    tokenizer.padding_side = "right"  # the crop assumes right padding (Qwen's default)
    lm = full.model.language_model
    del full  # frees the vision tower and the LM head
    return lm.eval().requires_grad_(False), tokenizer


def _bnb_4bit(dtype: torch.dtype):
    """NF4 double-quant config as in the official loader; a clear error without bitsandbytes."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise UserError("qwen_4bit needs the bitsandbytes package: pip install bitsandbytes") from None
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4"
    )


def _load_clip(path: str, dtype: torch.dtype):
    from transformers import AutoTokenizer, CLIPTextModel

    what = "CLIP text encoder"
    loaded = _from_pretrained(CLIPTextModel.from_pretrained, path, what, dtype=dtype, output_loading_info=True)
    model = _strict(loaded, path, what)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, _tokenizer_dir(path), f"{what} tokenizer")
    return model.eval().requires_grad_(False), tokenizer


# --------------------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------------------


class TextEncoder:
    """Qwen2.5-VL + CLIP prompt encoder; build it with ``TextEncoder.load``."""

    def __init__(self, qwen, qwen_tokenizer, clip, clip_tokenizer, names: tuple[str, str], qwen_4bit: bool = False):
        self.qwen, self.qwen_tokenizer = qwen, qwen_tokenizer  # Qwen2_5_VLTextModel (language model only)
        self.clip, self.clip_tokenizer = clip, clip_tokenizer  # CLIPTextModel
        self._names = names
        self.qwen_4bit = qwen_4bit  # bitsandbytes NF4 weights: placed at load time, never moved
        self._crop_cache: dict[str, int] = {}

    @classmethod
    def load(
        cls,
        qwen: str,
        clip: str,
        device="cpu",
        dtype=torch.bfloat16,
        qwen_4bit: bool = False,
    ) -> TextEncoder:
        """Load both encoders from local snapshot dirs (or hub ids, which need network or a warm cache)."""
        dtype = parse_dtype(dtype)
        device = torch.device(device)
        qwen, clip = str(qwen), str(clip)
        _resolve(qwen, "Qwen2.5-VL text encoder", _QWEN_TYPES)  # check both paths before loading anything big
        _resolve(clip, "CLIP text encoder", _CLIP_TYPES)
        qwen_lm, qwen_tok = _load_qwen(qwen, device, dtype, qwen_4bit)
        clip_model, clip_tok = _load_clip(clip, dtype)
        names = (_display_name(qwen), _display_name(clip))
        encoder = cls(qwen_lm, qwen_tok, clip_model, clip_tok, names, qwen_4bit=qwen_4bit)
        return encoder.to(device)

    # -- placement ----------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.clip.parameters()).dtype

    def to(self, device) -> TextEncoder:
        """Move both models (a 4-bit Qwen stays where bitsandbytes put it)."""
        if not self.qwen_4bit:
            self.qwen.to(device)
        self.clip.to(device)
        return self

    def offload(self) -> TextEncoder:
        """Park both models on the CPU (e.g. between caching and training) and free cached GPU memory."""
        self.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return self

    @property
    def identity(self) -> dict[str, str]:
        """Names and widths of both encoders, for cache metadata."""
        return {
            "qwen": self._names[0],
            "qwen_hidden": str(self.qwen.config.hidden_size),
            "clip": self._names[1],
            "clip_hidden": str(self.clip.config.hidden_size),
        }

    # -- Qwen -----------------------------------------------------------------------------------------------------

    def crop_start(self, template: str) -> int:
        """Number of tokens of the template text before ``{}`` (the positions dropped from the Qwen output)."""
        if template not in QWEN_TEMPLATES:
            raise UserError(f"unknown prompt template {template!r}; choose one of {', '.join(QWEN_TEMPLATES)}")
        if template not in self._crop_cache:
            self._crop_cache[template] = self._compute_crop(template)
        return self._crop_cache[template]

    def _compute_crop(self, template: str) -> int:
        prefix = QWEN_TEMPLATES[template].split("{}")[0]
        ids = self.qwen_tokenizer(prefix, add_special_tokens=True)["input_ids"]
        probe = self.qwen_tokenizer(QWEN_TEMPLATES[template].format("a"), add_special_tokens=True)["input_ids"]
        if probe[: len(ids)] != ids:
            log.warning("Qwen tokenizer merges across the end of the %r template prefix; the crop may be off", template)
        if self._real_qwen_tokenizer() and len(ids) != REAL_CROP_START[template]:
            log.warning(
                "Qwen tokenizer gives crop_start %d for template %r, the official code uses %d; check the tokenizer",
                len(ids),
                template,
                REAL_CROP_START[template],
            )
        return len(ids)

    def _real_qwen_tokenizer(self) -> bool:
        name = str(getattr(self.qwen_tokenizer, "name_or_path", "")).lower()
        return len(self.qwen_tokenizer) > _REAL_QWEN_VOCAB or "qwen2.5-vl" in name or "qwen2_5_vl" in name

    def _qwen_device(self) -> torch.device:
        return self.qwen.embed_tokens.weight.device

    def _encode_qwen(self, prompts: list[str], template: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        crop = self.crop_start(template)
        texts = [QWEN_TEMPLATES[template].format(p) for p in prompts]
        batch = self.qwen_tokenizer(
            texts, max_length=crop + max_length, truncation=True, padding=True, return_tensors="pt"
        ).to(self._qwen_device())
        out = self.qwen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        mask = batch["attention_mask"][:, crop:].bool()
        width = int(mask.sum(dim=1).max()) if mask.numel() else 0
        embeds, mask = out.last_hidden_state[:, crop : crop + width], mask[:, :width]
        return embeds.masked_fill(~mask[..., None], 0.0), mask

    # -- CLIP -----------------------------------------------------------------------------------------------------

    def _encode_clip(self, prompts: list[str]) -> torch.Tensor:
        batch = self.clip_tokenizer(
            prompts, max_length=CLIP_MAX_LENGTH, padding="max_length", truncation=True, return_tensors="pt"
        ).to(self.device)
        return self.clip(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output

    @torch.no_grad()
    def encode(self, prompts: list[str], template: str = "video", max_length: int = 256) -> TextEmbeds:
        """Encode a list of prompts (see the module docstring for what exactly is computed)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise UserError("encode() needs at least one prompt")
        if max_length < 1:
            raise UserError(f"text max_length must be >= 1, got {max_length}")
        embeds, mask = self._encode_qwen(list(prompts), template, max_length)
        pooled = self._encode_clip(list(prompts))
        return TextEmbeds(embeds, mask, pooled.to(embeds.device))
