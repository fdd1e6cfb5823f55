"""Build a tiny, deterministic, fully offline bundle of every Kandinsky 5 component, in the real on-disk formats.

    python -m kandinsky5.tiny_weights --output_dir DIR [--seed 0]

writes::

    DIR/vae/                 config.json + diffusion_pytorch_model.safetensors  (AutoencoderKLHunyuanVideo)
    DIR/text_encoder/        Qwen2_5_VLForConditionalGeneration snapshot + fast Qwen2 tokenizer
    DIR/text_encoder2/       CLIPTextModel snapshot + CLIP tokenizer
    DIR/model/k5_tiny_t2v.safetensors, DIR/model/k5_tiny_i2v.safetensors   DiT, official key layout, bf16

Sizes: the VAE keeps the real compression (spatial x8, temporal x4, 16 latent channels, scaling 0.476986) with
channels 16/32/32/32 and mid-block attention; Qwen has hidden 64 (2 layers, head dim 32, M-RoPE sections 4/6/6)
and CLIP hidden 32, matching ``configs.TINY_DIT`` (in_text_dim 64, in_text_dim2 32).

Tokenizers are built here, without downloads: the Qwen one is a byte-level BPE trained with the ``tokenizers``
library on a small built-in English corpus (the prompt templates plus some video captions), with Qwen's
pre-tokenizer and the chat/vision special tokens as single tokens; the CLIP one has the 256 byte symbols, their
``</w>`` forms, no merges, and ``<|endoftext|>`` as the largest id (pad = EOS, so pooling picks the first EOS).

Every weight is re-drawn from a ``torch.Generator`` seeded from ``--seed`` and the component: matrices N(0, 0.02)
for Qwen / CLIP and N(0, 1/fan_in) for the VAE and the DiT (so that text, time and neighbouring tokens visibly
change the DiT output); norm scales around 1; biases N(0, 0.02) (zero in Qwen / CLIP, as their usual init) -- so
the DiT modulation is not zero-initialised.
Two runs with the same seed give byte-identical files.  Files are written atomically (staging dir + rename).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from kandinsky5.common import atomic_path, get_logger, quiet_hf_progress
from kandinsky5.model.text_encoders import QWEN_TEMPLATES
from kandinsky5.model.vae import SCALING_FACTOR

__all__ = ["write_bundle", "main", "DIT_TASKS"]

log = get_logger(__name__)

DIT_TASKS = ("k5-tiny-t2v", "k5-tiny-i2v")
QWEN_HIDDEN = 64
CLIP_HIDDEN = 32
QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_MERGES = 400
# Qwen2's pre-tokenisation pattern (public, from the Qwen2 tokenizer.json)
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CAPTIONS = (
    "A red square slides slowly across a white screen while the camera stays still.",
    "A golden retriever runs along a sandy beach at sunset, waves rolling in behind it.",
    "The camera pans left over a busy city street full of cars, buses and people walking.",
    "A close-up of a cup of coffee on a wooden table, steam rising in the morning light.",
    "An astronaut floats inside a space station and waves at the camera.",
    "Aerial view of green mountains covered with fog, the drone flies forward slowly.",
    "A cartoon cat jumps over a fence in a colorful animated garden.",
    "Rain falls on a window at night; blurred neon lights shine in the background.",
    "A chef chops vegetables quickly in a professional kitchen, shot from above.",
    "Two children play football in a park, the camera follows the ball.",
    "A timelapse of clouds moving over a lake, with reflections on the water.",
    "A woman in a blue dress dances in an empty hall, slow motion, cinematic lighting.",
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, deformed.",
)

# --------------------------------------------------------------------------------------------------------------
# Deterministic re-drawing of weights
# --------------------------------------------------------------------------------------------------------------

_COMPONENT_OFFSETS = {"vae": 1, "qwen": 2, "clip": 3, "k5-tiny-t2v": 4, "k5-tiny-i2v": 5}


def _generator(seed: int, component: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000 + _COMPONENT_OFFSETS[component])


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _draw(shape: torch.Size, gen: torch.Generator, std: float, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean


def redraw_(model: nn.Module, gen: torch.Generator, matrix_std: float | None = 0.02, bias_std: float = 0.02) -> None:
    """Re-draw every parameter in module order: norms ~ 1 (+/-0.05), matrices N(0, std), 1-D params N(0, bias_std).

    ``matrix_std=None`` uses 1/sqrt(fan_in), which keeps activations O(1) through deep conv stacks.
    """
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if _is_norm(module):
                value = _draw(param.shape, gen, 0.05, 1.0 if name == "weight" else 0.0)
            elif param.ndim >= 2:
                std = matrix_std if matrix_std is not None else param[0].numel() ** -0.5
                value = _draw(param.shape, gen, std)
            else:
                value = _draw(param.shape, gen, bias_std)
            with torch.no_grad():
                param.copy_(value)


# --------------------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------------------


def build_vae(seed: int):
    """Tiny AutoencoderKLHunyuanVideo with the real x8 / x4 compression and 16 latent channels."""
    from diffusers import AutoencoderKLHunyuanVideo

    vae = AutoencoderKLHunyuanVideo(
        latent_channels=16,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        scaling_factor=SCALING_FACTOR,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    redraw_(vae, _generator(seed, "vae"), matrix_std=None)
    return vae.eval()


def _train_qwen_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE (Qwen pre-tokenizer) learned on the built-in corpus: (vocab, merges)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=256 + QWEN_MERGES,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [t.replace("{}", c) for t in QWEN_TEMPLATES.values() for c in _CAPTIONS] + list(_CAPTIONS)
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return dict(model["vocab"]), merges


def build_qwen_tokenizer():
    """Qwen2Tokenizer over the trained BPE, the 7 chat/vision specials appended (pad = <|endoftext|>)."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_qwen_bpe()
    base = len(vocab)
    vocab.update({tok: base + i for i, tok in enumerate(QWEN_SPECIALS)})
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIALS[1:]),
        model_max_length=32768,
        padding_side="right",
    )


def build_qwen(tokenizer, seed: int):
    """Tiny Qwen2.5-VL (text hidden 64, head dim 32 = 2 * (4 + 6 + 6)); vision ids point at the tokenizer's specials."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIALS}
    text_config = dict(
        vocab_size=(len(tokenizer) + 63) // 64 * 64,
        hidden_size=QWEN_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1000000.0},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[0])
    vision_config["out_hidden_size"] = QWEN_HIDDEN  # the vision merger projects into the LM width
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    redraw_(model, _generator(seed, "qwen"), bias_std=0.0)
    return model.eval()


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable-character table, in byte order (the CLIP vocab's first 256 symbols)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def build_clip_tokenizer():
    """CLIPTokenizer: 256 byte symbols, their </w> forms, no merges; <|startoftext|>, then <|endoftext|> last."""
    from transformers import CLIPTokenizer

    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def build_clip(tokenizer, seed: int):
    """Tiny CLIPTextModel (hidden 32); eos_token_id is the real EOS id, so pooling takes the first EOS."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_HIDDEN,
        intermediate_size=64,
        projection_dim=CLIP_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModel(config)
    redraw_(model, _generator(seed, "clip"), bias_std=0.0)
    return model.eval()


def build_dit_state(task: str, seed: int) -> dict[str, torch.Tensor]:
    """Official-layout DiT state dict for ``task`` with every tensor re-drawn, in bf16."""
    from kandinsky5.configs import get_task
    from kandinsky5.model.dit import DiT

    dit = DiT(get_task(task).dit)
    # 1/sqrt(fan_in) rather than 0.02: at width 128 a 0.02 init leaves the output almost blind to text (3 %) and
    # time (0.5 %); fan-in scaling makes both matter (~50 % / ~75 % of the output std) while staying O(1).
    redraw_(dit, _generator(seed, task), matrix_std=None)
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in dit.state_dict().items()}


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def _save_dir(dest: Path, savers: Iterable[Callable[[str], object]]) -> None:
    """Run ``save_pretrained``-style savers into a staging dir, then move each file into ``dest`` atomically."""
    dest.mkdir(parents=True, exist_ok=True)
    quiet_hf_progress()  # no "Writing model shards" bar per model
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.staging.") as staging:
        for save in savers:
            save(staging)
        for src in sorted(Path(staging).iterdir()):
            _normalise_json(src)
            with atomic_path(dest / src.name) as tmp:
                shutil.move(src, tmp)


def _normalise_json(path: Path) -> None:
    """Drop path-dependent fields some savers write (``_name_or_path``), so bytes do not depend on the output dir."""
    if path.suffix != ".json" or path.name == "tokenizer.json":
        return
    data = json.loads(path.read_text())
    if isinstance(data, dict) and ("_name_or_path" in data or "name_or_path" in data):
        data.pop("_name_or_path", None)
        data.pop("name_or_path", None)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _save_dit(path: Path, task: str, seed: int) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(build_dit_state(task, seed), str(tmp), metadata={"format": "pt", "k5_task": task})
        _sort_safetensors_metadata(tmp)


def _sort_safetensors_metadata(path: Path) -> None:
    """safetensors writes ``__metadata__`` in hash-map order; rewrite the header with sorted metadata keys."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) > size:
        raise RuntimeError(f"re-serialised safetensors header of {path} grew from {size} to {len(text)} bytes")
    path.write_bytes(raw[:8] + text.ljust(size) + raw[8 + size :])


def write_bundle(output_dir: str | Path, seed: int = 0) -> Path:
    """Write the whole bundle under ``output_dir`` (see the module docstring) and return its path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_dir(out / "vae", [build_vae(seed).save_pretrained])
    qwen_tok = build_qwen_tokenizer()
    _save_dir(out / "text_encoder", [build_qwen(qwen_tok, seed).save_pretrained, qwen_tok.save_pretrained])
    clip_tok = build_clip_tokenizer()
    _save_dir(out / "text_encoder2", [build_clip(clip_tok, seed).save_pretrained, clip_tok.save_pretrained])
    from kandinsky5.configs import get_task

    for task in DIT_TASKS:
        _save_dit(out / "model" / get_task(task).checkpoint, task, seed)
    return out


def format_tree(root: Path) -> str:
    """Indented listing of ``root`` with file sizes."""
    lines = [f"{root}/"]
    for path in sorted(p for p in root.rglob("*") if not p.name.startswith(".")):
        rel = path.relative_to(root)
        indent = "    " * (len(rel.parts) - 1)
        size = "" if path.is_dir() else f"  ({path.stat().st_size / 1024:.1f} KiB)"
        lines.append(f"  {indent}{rel.name}{'/' if path.is_dir() else ''}{size}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kandinsky5.tiny_weights",
        description="Write a tiny random-weight Kandinsky 5 bundle (VAE, Qwen2.5-VL, CLIP, DiT t2v/i2v) for tests.",
    )
    parser.add_argument("--output_dir", required=True, help="directory to write the bundle into (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed for every random weight (default: 0)")
    args = parser.parse_args(argv)
    root = write_bundle(args.output_dir, args.seed)
    print(format_tree(root))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
