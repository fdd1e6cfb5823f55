"""Generate Kandinsky 5 videos (T2V, I2V first frame, first+last frame) from the command line.

    python kandinsky5_generate_video.py --task k5-pro-t2v-5s-sd --dit DIT --vae VAE \\
        --text_encoder_qwen QWEN --text_encoder_clip CLIP --prompt "A cat walks on the grass." --output cat.mp4

Stages, in memory order (peak = the largest stage, not the sum): text encoders encode every prompt and are freed
-> VAE encodes the conditioning images -> DiT (fp8 / block swap from the flags, LoRAs merged or applied) samples ->
the DiT is offloaded if asked -> VAE decodes -> ``.mp4`` (h264) or ``.png`` with the settings in its metadata.

Layouts: see ``kandinsky5/sampling/pipeline.py``.  Latent files (``--save_latents`` /
``--decode_latents``) are safetensors
with one tensor ``latents`` (1, T, h, w, 16) float32 and the generation settings as string metadata.

Every flag is documented by ``--help`` and in ``docs/inference.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from kandinsky5.cli import (
    HelpFormatter,
    add_attention_args,
    add_compile_args,
    add_config_file_arg,
    add_debug_arg,
    add_magcache_args,
    add_memory_args,
    add_model_args,
    attention_spec_from_args,
    parse_args,
    run_main,
    task_from_args,
)
from kandinsky5.common import UserError, get_logger, parse_dtype, resolve_device
from kandinsky5.configs import TaskConfig, latent_frames
from kandinsky5.files import load_safetensors, read_safetensors_header, save_safetensors
from kandinsky5.memory.planner import check_generation_memory
from kandinsky5.musubi_compat import add_musubi_args
from kandinsky5.preflight import check_output_files, warn_task_mismatch
from kandinsky5.sampling.guidance import CFG_MODES
from kandinsky5.sampling.pipeline import GenerationRequest, GenerationResult, Kandinsky5Pipeline, request_from_line
from kandinsky5.sampling.prompts import PromptLine, prepend_trigger, read_prompt_file
from kandinsky5.sampling.video_io import check_writable, estimate_bytes, to_uint8_frames, write_image, write_video

log = get_logger("kandinsky5_generate_video")

LATENTS_KEY = "latents"
LATENTS_FORMAT = "kandinsky5-latents-v1"


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate a video (or an image) with a Kandinsky 5 model.  Defaults come from --task.",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    add_model_args(parser)
    add_attention_args(parser)
    add_memory_args(parser)
    add_compile_args(parser)
    add_magcache_args(parser)
    add_config_file_arg(parser)
    add_debug_arg(parser)
    _add_generation_args(parser)
    _add_conditioning_args(parser)
    _add_output_args(parser)
    _add_runtime_args(parser)
    add_musubi_args(parser, "generate")
    return parser


def _add_generation_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("generation (unset values come from --task)")
    g.add_argument("--prompt", default=None, help="text prompt (or use --prompt_file)")
    g.add_argument(
        "--prompt_file",
        default=None,
        help="text file, one generation per line with optional overrides --w --h --f --d --s --g --n --i --l "
        "(see docs/inference.md; lines starting with # are skipped), or musubi's .toml / .json prompt file",
    )
    g.add_argument(
        "--negative_prompt",
        default=None,
        help="negative prompt for classifier-free guidance (default: the official one, 'Static, 2D cartoon, ...')",
    )
    g.add_argument("--width", type=int, default=None, help="output width in pixels, multiple of 16 (task default)")
    g.add_argument("--height", type=int, default=None, help="output height in pixels, multiple of 16 (task default)")
    g.add_argument(
        "--frames",
        type=int,
        default=None,
        help="number of VIDEO frames, 4k+1 (1, 5, ..., 121 = 5 s at 24 fps); 1 writes an image (task default). "
        "musubi's --frames counts latent frames: its --frames 17 is --frames 65 here",
    )
    g.add_argument("--steps", type=int, default=None, help="denoising steps (task default, 50 for most)")
    g.add_argument("--guidance", type=float, default=None, help="CFG weight, 1 = no negative pass (task default)")
    g.add_argument(
        "--cfg_mode",
        choices=CFG_MODES,
        default="auto",
        help="cond + negative DiT calls: auto (default: the faster one measured per device and size: batched on "
        "CUDA; on the CPU batched up to 1024 visual tokens, two calls above), batched (one call, padded text), "
        "two_calls (as official)",
    )
    g.add_argument(
        "--scheduler_scale", type=float, default=None, help="time-grid shift s in t = s*u/(1+(s-1)*u) (task default)"
    )
    g.add_argument(
        "--seed", type=int, default=42, help="noise seed (default 42); a prompt-file line may set its own with --d"
    )


def _add_conditioning_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("image conditioning")
    g.add_argument(
        "--i",
        "--image",
        dest="image",
        default=None,
        help="first-frame image (I2V).  The video size follows the image (area ~ task's, sides multiples of 16 or "
        "128) unless --width and --height are given (then resized and center-cropped to them)",
    )
    g.add_argument(
        "--image_last", default=None, help="last-frame image (first+last conditioning, needs --image; experimental)"
    )


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("output")
    g.add_argument(
        "--output",
        default=None,
        help="output file: .mp4 (h264 video) or .png (one frame); with a prompt file, _000, _001, ... are added",
    )
    g.add_argument("--fps", type=float, default=None, help="frame rate of the written mp4 (task default, 24)")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files (default: refuse)")
    g.add_argument(
        "--save_latents", default=None, help="also save the sampled latents to this .safetensors file (decodable later)"
    )
    g.add_argument(
        "--decode_latents",
        default=None,
        help="skip sampling: decode a --save_latents file with --vae and write --output (no DiT, no text encoders)",
    )


def _add_runtime_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float16", "float32"),
        help="weight/compute dtype of the DiT, text encoders and VAE (default bfloat16)",
    )
    g.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if present)")
    g.add_argument("--vae_tiling", action="store_true", help="decode in spatial tiles (less memory, tiny seams)")
    g.add_argument("--qwen_4bit", action="store_true", help="load Qwen2.5-VL in 4-bit NF4 (needs bitsandbytes)")
    g = parser.add_argument_group("LoRA")
    g.add_argument(
        "--lora_weight",
        nargs="+",
        default=[],
        help="adapter file(s): LoRA/LoHa/LoKr in our, musubi, ComfyUI, LyCORIS or diffusers/PEFT keys, or an "
        "official LoRA directory (config_lora.json + .safetensors); default: none",
    )
    g.add_argument(
        "--lora_multiplier", nargs="+", type=float, default=[], help="one multiplier per --lora_weight (default 1.0)"
    )
    g.add_argument(
        "--lora_mode",
        choices=("merge", "runtime"),
        default="merge",
        help="merge: add the LoRA into the weights once (fast, fp8-aware); runtime: keep it as a side branch",
    )
    g.add_argument(
        "--no_lora_trigger",
        action="store_true",
        help="do not prepend a LoRA's trigger word (its 'trigger' metadata, as the official pipeline does) to the "
        "prompts (default: prepend)",
    )


# ----------------------------------------------------------------------------------------------------------------
# requests and outputs
# ----------------------------------------------------------------------------------------------------------------


def _prompt_lines(args: argparse.Namespace) -> list[PromptLine]:
    if args.prompt and args.prompt_file:
        raise UserError("give either --prompt or --prompt_file, not both")
    if args.prompt_file:
        return read_prompt_file(args.prompt_file)
    if not args.prompt:
        raise UserError("--prompt (or --prompt_file) is required")
    return [PromptLine(prompt=args.prompt)]


def _request(args: argparse.Namespace, task: TaskConfig, line: PromptLine) -> GenerationRequest:
    """One request: task defaults < command-line flags < prompt-line overrides."""
    frames = args.frames
    if frames is None and args.output and Path(args.output).suffix.lower() == ".png":
        frames = 1  # a .png output means one frame unless --frames says otherwise
    return request_from_line(
        task,
        line,
        seed=args.seed,
        width=args.width,
        height=args.height,
        frames=frames,
        steps=args.steps,
        guidance=args.guidance,
        scheduler_scale=args.scheduler_scale,
        negative_prompt=args.negative_prompt,
        image=args.image,
        image_last=args.image_last,
        fps=args.fps,
        extra_metadata=_run_metadata(args, task),
    )


def _run_metadata(args: argparse.Namespace, task: TaskConfig) -> dict[str, str]:
    meta = {"task": task.name, "dit": Path(args.dit).name if args.dit else "", "generator": "kandinsky5-tuner"}
    if args.lora_weight:
        mults = _lora_multipliers(args)
        meta["loras"] = json.dumps({Path(p).name: m for p, m in zip(args.lora_weight, mults)})
        meta["lora_mode"] = args.lora_mode
    return meta


def _indexed(path: Path, index: int, count: int, suffix: str) -> Path:
    stem = f"{path.stem}_{index:03d}" if count > 1 else path.stem
    return path.with_name(stem + suffix)


def _media_path(output: str, index: int, count: int, frames: int) -> Path:
    """Output file of generation ``index``: a single frame is a .png, a video an .mp4."""
    path = Path(output)
    suffix = path.suffix.lower()
    if suffix == ".png" and frames > 1:
        raise UserError(f"--output {output} is a .png but {frames} frames were asked; use .mp4 or --frames 1")
    if suffix == ".mp4" and frames == 1:
        log.info("one frame requested: writing a .png instead of %s", output)
        suffix = ".png"
    return _indexed(path, index, count, suffix)


def _plan_outputs(args, requests: list[GenerationRequest]) -> tuple[list[Path | None], list[Path | None]]:
    """(media paths, latent paths) per request, all checked for existence before any model is loaded."""
    if not args.output and not args.save_latents and not args.magcache_calibrate:
        raise UserError("--output is required (or --save_latents to keep only the latents)")
    n = len(requests)
    media = [_media_path(args.output, i, n, r.spec.frames) if args.output else None for i, r in enumerate(requests)]
    latents = [_indexed(Path(args.save_latents), i, n, ".safetensors") if args.save_latents else None for i in range(n)]
    for path in media:
        if path is not None:
            check_writable(path, args.overwrite)
    for path in latents:
        if path is not None and path.exists() and not args.overwrite:
            raise UserError(f"--save_latents {path} already exists; pass --overwrite to replace it")
    if len(set(media + latents) - {None}) != len([p for p in media + latents if p is not None]):
        raise UserError("two generations would write the same file; use distinct --output and --save_latents")
    check_output_files(_output_sizes(media, latents, requests), "output directory")
    return media, latents


def _output_sizes(media: list, latents: list, requests: list[GenerationRequest]) -> list[tuple[Path, int]]:
    """(path, estimated bytes) of every file this run writes (for the free-space check)."""
    sizes = []
    for path, latent, r in zip(media, latents, requests):
        spec = r.spec
        if path is not None:
            sizes.append((path, estimate_bytes(path, spec.frames, spec.width, spec.height)))
        if latent is not None:
            sizes.append((latent, latent_frames(spec.frames) * (spec.width // 8) * (spec.height // 8) * 16 * 4))
    return sizes


# ----------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------


def _check_model_inputs(args: argparse.Namespace, task: TaskConfig):
    """Everything about the DiT side that can be checked before any model is loaded -> (attention, memory)."""
    from kandinsky5.memory.build import memory_config_from_args
    from kandinsky5.memory.compile import compile_config_from_args
    from kandinsky5.model.loading import checkpoint_files, checkpoint_metadata

    if not args.dit:
        raise UserError("--dit is required (the task fixes the architecture, not the weights)")
    checkpoint_files(args.dit)
    warn_task_mismatch(args.dit, checkpoint_metadata(args.dit), task, "--dit")  # also validates the header
    args.lora_multiplier = _lora_multipliers(args)  # one value per file from here on (the warning is said once)
    for path in args.lora_weight:
        if not Path(path).is_dir():  # an official LoRA directory is checked when it is read, just after
            read_safetensors_header(path, "--lora_weight")  # a missing, truncated or foreign file: one line, now
    args.compile_config = compile_config_from_args(args, resolve_device(args.device).type, args.blocks_to_swap)
    precision = (getattr(torch, args.dtype), f"--dtype {args.dtype}")
    return attention_spec_from_args(args, task, precision), memory_config_from_args(args)


def _lora_multipliers(args: argparse.Namespace) -> list[float]:
    weights, mults = args.lora_weight, list(args.lora_multiplier)
    if len(mults) > len(weights):
        raise UserError(f"{len(mults)} --lora_multiplier values for {len(weights)} --lora_weight files")
    if mults and len(mults) < len(weights):
        log.warning("fewer --lora_multiplier values than --lora_weight files: the rest use 1.0")
    return mults + [1.0] * (len(weights) - len(mults))


def _warn_lora_settings(path: str, metadata: dict, task: TaskConfig, scheduler_scale: float | None) -> None:
    """Warn (once per file) when a LoRA was trained for the other mode (T2V/I2V) or another scheduler scale."""
    trained_task = metadata.get("k5_task")
    if trained_task:
        trained_i2v = "i2v" in trained_task
        if trained_i2v != task.is_i2v:
            log.warning("LoRA %s was trained on %s (%s) and is used with %s (%s)", path, trained_task,
                        "I2V" if trained_i2v else "T2V", task.name, "I2V" if task.is_i2v else "T2V")  # fmt: skip
    trained_scale = metadata.get("k5_scheduler_scale")
    used = task.scheduler_scale if scheduler_scale is None else scheduler_scale
    if trained_scale and float(trained_scale) != float(used):
        log.warning(
            "LoRA %s was trained with --scheduler_scale %s; sampling uses %s (pass --scheduler_scale %s to match)",
            path, trained_scale, used, trained_scale,
        )  # fmt: skip


def _read_loras(args: argparse.Namespace) -> list:
    """Every --lora_weight read into canonical form (headers and tensors; nothing applied yet)."""
    from networks.lora_kandinsky import read_adapter

    adapters = []
    for path in args.lora_weight:
        try:
            adapters.append(read_adapter(path, "--lora_weight"))
        except (OSError, ValueError) as exc:
            raise UserError(f"LoRA {path} could not be read: {exc}") from None
    return adapters


def _trigger_lines(lines: list[PromptLine], adapters: list, enabled: bool) -> list[PromptLine]:
    """Prepend each LoRA's trigger word to every prompt, as the official pipeline does (logged once)."""
    triggers = [a.trigger for a in adapters if a.trigger]
    if not triggers or not enabled:
        return lines
    for adapter in adapters:
        if adapter.trigger:
            log.info("LoRA %s: trigger %r prepended to the prompts (--no_lora_trigger to stop)",
                     adapter.weights_path, adapter.trigger)  # fmt: skip
    out = []
    for line in lines:
        prompt = line.prompt
        for trigger in reversed(triggers):
            prompt = prepend_trigger(trigger, prompt)
        out.append(dataclasses.replace(line, prompt=prompt))
    return out


def _adapter_network(adapter, mult: float, dit: torch.nn.Module, task: TaskConfig):
    """One --lora_weight as a network on ``dit`` (real or meta); a key that cannot be applied is one line."""
    from networks.adapters import AdapterKeyError
    from networks.lora_kandinsky import create_network_from_weights

    try:
        return create_network_from_weights(mult, adapter.sd, dit, True, adapter.metadata, adapter.origins)
    except AdapterKeyError as exc:
        raise UserError(
            f"LoRA {adapter.weights_path} does not fit the DiT of task {task.name}: first unmatched key "
            f"{exc.key!r} ({exc.reason}); was it trained for another model or task?"
        ) from None


def _check_adapters(args: argparse.Namespace, task: TaskConfig, adapters: list, act_bytes: int) -> dict:
    """Every --lora_weight fitted to a weightless (meta) DiT before the real one loads; returns the activation
    model's adapter fields for runtime mode (the largest LoHa ΔW formed in a forward), else nothing."""
    from kandinsky5.memory.activations import network_workload
    from kandinsky5.model.dit import DiT

    with torch.device("meta"):
        dit = DiT(task.dit)
    networks = [_adapter_network(a, m, dit, task) for a, m in zip(adapters, _lora_multipliers(args))]
    if args.lora_mode != "runtime" or not networks:
        return {}
    return {"delta_forward": max(network_workload(n, act_bytes)["delta_forward"] for n in networks)}


def _apply_loras(dit: torch.nn.Module, args: argparse.Namespace, task: TaskConfig, device, adapters: list) -> list:
    """Merge (or attach, in runtime mode) every --lora_weight; returns the runtime networks (keep them alive).

    Every file is checked against the DiT before any weight changes: a key that cannot be applied is an error
    naming the file and the key."""
    networks = []
    for adapter, mult in zip(adapters, _lora_multipliers(args)):
        _warn_lora_settings(str(adapter.weights_path), adapter.metadata, task, args.scheduler_scale)
        networks.append(_adapter_network(adapter, mult, dit, task))
    for adapter, network, mult in zip(adapters, networks, _lora_multipliers(args)):
        if args.lora_mode == "merge":
            network.merge_into(dit)
        else:
            network.to(device)
            network.apply_to(dit)
        log.info("LoRA %s (%s, multiplier %s): %s", adapter.weights_path, args.lora_mode, mult, network.summary())
    return networks if args.lora_mode == "runtime" else []


def _magcache_setup(args, task: TaskConfig, requests: list[GenerationRequest]):
    """--magcache (config) or --magcache_calibrate (calibrator) or None, checked now; requests get its metadata."""
    from kandinsky5.sampling.magcache import calibrator_from_args, magcache_from_args

    magcache = magcache_from_args(args, task)
    if magcache is None:
        return calibrator_from_args(args, task, [r.spec for r in requests]), requests
    meta = {"magcache": magcache.describe()}
    return magcache, [replace(r, extra_metadata={**r.extra_metadata, **meta}) for r in requests]


def _write_calibration(args, calibrator, request: GenerationRequest) -> None:
    from kandinsky5.model.loading import file_fingerprint

    spec = request.spec
    meta = {
        "checkpoint": Path(args.dit).name,
        "checkpoint_hash": file_fingerprint(args.dit),
        "checkpoint_hash_method": "sha256 of file size + first MiB (kandinsky5.model.loading.file_fingerprint)",
        "loras": {Path(p).name: m for p, m in zip(args.lora_weight, args.lora_multiplier)},
        "guidance": spec.guidance,
        "scheduler_scale": spec.scheduler_scale,
        "size": f"{spec.width}x{spec.height}x{spec.frames}",
        "dtype": args.dtype,
    }
    path = calibrator.write(args.magcache_calibrate, meta, overwrite=args.overwrite)
    print(f"wrote MagCache ratios to {path} (use them with --magcache_ratios {path})")


def _load_dit(args: argparse.Namespace, task: TaskConfig, device, dtype, attention, memory):
    from kandinsky5.memory.build import build_dit

    return build_dit(task, args.dit, device, dtype, attention, memory, training=False, compile=args.compile_config)


# ----------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------


def _write_media(path: Path, frames, fps: float, metadata: dict[str, str], overwrite: bool) -> Path:
    if path.suffix.lower() == ".png":
        return write_image(path, frames[0], metadata, overwrite=overwrite)
    return write_video(path, frames, fps, metadata, overwrite=overwrite)


def _save_latents(path: Path, result: GenerationResult, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UserError(f"--save_latents {path} already exists; pass --overwrite to replace it")
    meta = {**result.metadata, "format": LATENTS_FORMAT}
    save_safetensors({LATENTS_KEY: result.latents.float().contiguous()}, path, meta, what="--save_latents")
    print(f"saved latents {tuple(result.latents.shape)} to {path}")


def _decode_only(args: argparse.Namespace) -> int:
    """--decode_latents: VAE decode of a saved latents file, written to --output with the file's settings."""
    if not args.output or not args.vae:
        raise UserError("--decode_latents needs --vae and --output")
    tensors, meta = load_safetensors(args.decode_latents, "--decode_latents")
    if LATENTS_KEY not in tensors:
        raise UserError(f"--decode_latents {args.decode_latents}: not a latents file (no {LATENTS_KEY!r} tensor)")
    latents = tensors[LATENTS_KEY]
    frames_count = 4 * (latents.shape[1] - 1) + 1
    path = _media_path(args.output, 0, 1, frames_count)
    check_writable(path, args.overwrite)
    size = estimate_bytes(path, frames_count, 8 * latents.shape[3], 8 * latents.shape[2])
    check_output_files([(path, size)], "output directory")
    device, dtype = resolve_device(args.device), parse_dtype(args.dtype)
    from kandinsky5.model.vae import VideoVAE

    vae = VideoVAE.load(args.vae, device, dtype, tiling=args.vae_tiling)
    frames = to_uint8_frames(vae.decode(latents))[0]
    fps = args.fps or float(meta.get("fps", 24))
    meta.pop("format", None)
    written = _write_media(path, frames, fps, {**meta, "decoded_from": str(args.decode_latents)}, args.overwrite)
    print(f"wrote {written}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if args.decode_latents:
        return _decode_only(args)
    task = task_from_args(args)
    device, dtype = resolve_device(args.device), parse_dtype(args.dtype)
    lines = _prompt_lines(args)
    attention, memory = _check_model_inputs(args, task)
    adapters = _read_loras(args)  # read and checked before any model loads; triggers change the prompts
    requests = [_request(args, task, line) for line in _trigger_lines(lines, adapters, not args.no_lora_trigger)]
    media_paths, latent_paths = _plan_outputs(args, requests)
    step_cache, requests = _magcache_setup(args, task, requests)
    runtime = bool(args.lora_weight) and args.lora_mode == "runtime"
    adapter_work = _check_adapters(args, task, adapters, dtype.itemsize)
    memory = check_generation_memory(task, args.dit, device, dtype, attention, memory, requests, runtime,
                                     step_cache=step_cache is not None, adapter_work=adapter_work)  # fmt: skip
    if not args.vae and (args.output or any(r.image is not None for r in requests)):
        raise UserError("--vae is required (it decodes the video and encodes conditioning images)")
    if not (args.text_encoder_qwen and args.text_encoder_clip):
        raise UserError("--text_encoder_qwen and --text_encoder_clip are required to encode the prompts")
    pipe = Kandinsky5Pipeline(
        task,
        text_encoder_qwen=args.text_encoder_qwen,
        text_encoder_clip=args.text_encoder_clip,
        vae_path=args.vae,
        device=device,
        dtype=dtype,
        qwen_4bit=args.qwen_4bit,
        vae_tiling=args.vae_tiling,
        cfg_mode=args.cfg_mode,
        magcache=step_cache,
    )
    pipe.encode_prompts(requests)
    pipe.release_text_encoder()
    prepared = [pipe.prepare(r) for r in requests]
    dit = _load_dit(args, task, device, dtype, attention, memory)
    runtime_loras = _apply_loras(dit, args, task, device, adapters)  # noqa: F841 -- keeps the runtime LoRA branches alive
    offload = args.offload_dit_during_sampling
    results = pipe.generate_iter(dit, prepared, decode=args.output is not None, offload_dit=offload, restore=False)
    for index, result in enumerate(results):
        _finish(args, result, media_paths[index], latent_paths[index])
    if args.magcache_calibrate:
        _write_calibration(args, step_cache, requests[0])
    return 0


def _finish(args: argparse.Namespace, result: GenerationResult, media: Path | None, latents: Path | None) -> None:
    if latents is not None:
        _save_latents(latents, result, args.overwrite)
    if media is not None:
        spec = result.request.spec
        written = _write_media(media, result.frames, result.request.fps, result.metadata, args.overwrite)
        print(f"wrote {written} ({spec.frames} frames, {spec.width}x{spec.height}, seed {spec.seed})")


if __name__ == "__main__":
    sys.exit(run_main(main))
