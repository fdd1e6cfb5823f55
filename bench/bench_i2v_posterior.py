"""How much does the I2V image latent change between the posterior mode (what we cache and sample with) and the
official inference's posterior *sample* in fp16?  Measured on the offline tiny VAE (random weights).

    python bench/bench_i2v_posterior.py            # prints a markdown table (CPU, about 10 s)

For one 1-frame image (smooth colour ramps plus a square, 128x128, as I2V inference encodes it) it reports
``max |a - b| / max |mode|`` and the RMS ratio for:

* sample vs mode (fp32): the noise the official ``latent_dist.sample()`` adds (std = exp(logvar / 2));
* mode fp16 vs mode fp32: the precision the official code encodes in (fp16) against our run dtype;
* sample fp16 vs mode fp32: both official differences together.

The tiny VAE's posterior variance comes from random weights, so its absolute numbers say nothing about the real
HunyuanVideo VAE; what carries over is the structure (the sample is the mode plus independent Gaussian noise of the
posterior std, so its expected value *is* the mode).  docs/training.md records the numbers of the last run.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kandinsky5.model.vae import VideoVAE  # noqa: E402
from kandinsky5.tiny_weights import write_bundle  # noqa: E402


def _image(size: int = 128) -> torch.Tensor:
    """(1, 3, 1, H, W) in [-1, 1]: colour ramps and a bright square."""
    ramp = torch.linspace(-1, 1, size)
    img = torch.stack(
        [ramp[None, :].expand(size, size), ramp[:, None].expand(size, size), (-0.5 * ramp[None, :]).expand(size, size)]
    )
    img[:, size // 4 : size // 2, size // 4 : size // 2] = 0.9
    return img[None, :, None]


def _rel(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = (a.float() - b.float()).abs()
    return float(diff.max() / ref.abs().max()), float(diff.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def main() -> int:
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = write_bundle(Path(tmp) / "bundle", seed=0)
        image = _image()
        vae32 = VideoVAE.load(str(bundle / "vae"), "cpu", torch.float32)
        vae16 = VideoVAE.load(str(bundle / "vae"), "cpu", torch.float16)
        mode32 = vae32.encode(image)
        sample32 = vae32.encode(image, generator=torch.Generator().manual_seed(0), sample=True)
        mode16 = vae16.encode(image)
        sample16 = vae16.encode(image, generator=torch.Generator().manual_seed(0), sample=True)
    rows = [
        ("sample vs mode, fp32", _rel(sample32, mode32, mode32)),
        ("mode fp16 vs mode fp32", _rel(mode16, mode32, mode32)),
        ("sample fp16 (official) vs mode fp32 (ours)", _rel(sample16, mode32, mode32)),
    ]
    print(f"tiny VAE, 1 image 128x128, latent {tuple(mode32.shape)}, torch {torch.__version__}, CPU, "
          f"{time.strftime('%Y-%m-%d')}, {time.time() - start:.1f} s")  # fmt: skip
    print("\n| comparison | max abs diff / max abs mode | RMS diff / RMS mode |\n|---|---:|---:|")
    for name, (peak, rms) in rows:
        print(f"| {name} | {peak:.2e} | {rms:.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
