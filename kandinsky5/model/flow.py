"""Rectified-flow maths shared by the trainer and the sampler (pure torch, no model imports).

Convention (official Kandinsky 5, ``architecture.md`` 4.1): **t = 1 is pure noise, t = 0 is data**::

    x_t    = (1 - t) * x0 + t * eps          noisy_input(x0, eps, t)
    v      = d x_t / dt = eps - x0           velocity_target(x0, eps)   (what the DiT predicts)
    time   = 1000 * t, float32, no "+1"      dit_time(t)                (the DiT's time input)

Layouts: ``x0``/``eps`` are any batch-first tensor, e.g. ``(B, T, H, W, C)`` channels-last latents; ``t`` is
``(B,)`` (one time per sample, broadcast over the other dims) or a scalar.

Training timesteps (``sample_timesteps``)
-----------------------------------------
Every mode is written as a monotone *quantile function* ``t = Q(u)``, ``u ~ U(0, 1)``.  The user's
``--min_timestep / --max_timestep`` (0..1000 scale) therefore mean the same thing in every mode: the returned t
lies in ``[min/1000, max/1000]``.  It is implemented by inverse-CDF sampling on the truncated range: the bounds
are mapped back to ``u_lo = Q^-1(min/1000)``, ``u_hi = Q^-1(max/1000)`` (bisection, Q is monotone) and
``u ~ U(u_lo, u_hi)``.  This draws *exactly* the mode's distribution conditioned on the range -- no rejection
loop, no clamping spikes at the bounds, no linear squashing that changes the shape (musubi rescales linearly by
default and rejection-samples with ``--preserve_distribution_shape``; its ``sigma`` mode even inverts the range,
defect #21).  ``timesteps_from_uniform`` exposes the same map for stratified (bucketed) uniforms.

Sampling (``sampling_sigmas`` / ``euler_step`` / ``cfg_combine``)
-----------------------------------------------------------------
The official grid: ``u = linspace(1, 0, steps + 1)``, ``t = s*u / (1 + (s - 1)*u)`` with ``s = scheduler_scale``,
evaluated in fp32 in exactly that operation order; explicit Euler ``x <- x + (t_next - t_cur) * v``; classifier-free
guidance ``v_u + w (v_c - v_u)`` with the unconditional pass skipped when ``|w - 1| <= 1e-6``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "TIMESTEP_MODES",
    "WEIGHTING_SCHEMES",
    "TimestepConfig",
    "sample_timesteps",
    "timesteps_from_uniform",
    "shift_time",
    "noisy_input",
    "velocity_target",
    "dit_time",
    "sampling_sigmas",
    "euler_step",
    "cfg_combine",
    "needs_uncond",
]

TIMESTEP_MODES = ("uniform", "sigmoid", "shift", "logsnr", "sigma")
WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform")  # densities of the `sigma` mode (musubi --weighting_scheme)
NUM_TRAIN_TIMESTEPS = 1000  # the 0..1000 scale of --min_timestep/--max_timestep and of the DiT's time input
_MODE_SCALE_MAX = 1.0 / (math.pi / 2.0 - 1.0)  # beyond this the "mode" density map stops being monotone


@dataclass(frozen=True)
class TimestepConfig:
    """How training draws t in [0, 1] (t = 1 noise).  Field names follow musubi's flags.

    mode:
      * ``uniform``  t ~ U(0, 1)
      * ``sigmoid``  t = sigmoid(sigmoid_scale * z), z ~ N(0, 1)
      * ``shift``    the sigmoid draw, then ``t <- shift*t / (1 + (shift-1)*t)`` (default;
        shift = --discrete_flow_shift)
      * ``logsnr``   lambda ~ N(logit_mean, logit_std), t = sigmoid(-lambda / 2)
      * ``sigma``    musubi's default family: t = 1 - u' with u' from ``weighting_scheme`` (``logit_normal``:
        sigmoid(N(logit_mean, logit_std)); ``mode``: SD3's mode density with ``mode_scale``; ``uniform``), **no
        shift**, snapped up to the 1000-step grid {0.001, ..., 1.0} so the DiT sees integer times 1..1000 as in
        musubi (which indexes its descending schedule with u').
    Resolution-dependent modes (musubi's flux_shift, qwen_shift, ...) are not offered: their shift is a function
    of the latent size, which a per-batch sampler without image size cannot define.
    """

    mode: str = "shift"
    shift: float = 5.0  # --discrete_flow_shift
    sigmoid_scale: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    weighting_scheme: str = "logit_normal"  # only for mode="sigma"
    mode_scale: float = 1.29  # only for mode="sigma", weighting_scheme="mode"
    min_timestep: float = 0.0  # 0..1000 scale: the returned t lies in [min_timestep/1000, max_timestep/1000]
    max_timestep: float = 1000.0

    def __post_init__(self) -> None:
        if self.mode not in TIMESTEP_MODES:
            raise ValueError(f"unknown timestep mode {self.mode!r}; valid modes: {', '.join(TIMESTEP_MODES)}")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(
                f"unknown weighting_scheme {self.weighting_scheme!r}; valid: {', '.join(WEIGHTING_SCHEMES)}"
            )
        if not 0.0 <= self.min_timestep < self.max_timestep <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(
                f"need 0 <= min_timestep < max_timestep <= 1000, got {self.min_timestep} / {self.max_timestep}"
            )
        for name in ("shift", "sigmoid_scale", "logit_std"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not -1.0 < self.mode_scale < _MODE_SCALE_MAX:
            raise ValueError(f"mode_scale must be in (-1, {_MODE_SCALE_MAX:.3f}) for a monotone map")
        if self.mode == "sigma" and math.ceil(self.min_timestep) > math.floor(self.max_timestep):
            raise ValueError("mode 'sigma' uses integer timesteps: [min_timestep, max_timestep] holds no integer")


# ----------------------------------------------------------------------------------------------------------------
# timestep quantile functions t = Q(u), all monotone increasing on [0, 1]
# ----------------------------------------------------------------------------------------------------------------


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow shift ``s*t / (1 + (s-1)*t)``: monotone on [0, 1], fixes 0 and 1, s > 1 moves mass to noise."""
    return shift * t / (1 + (shift - 1) * t)


def _normal_ppf(u: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtri(u)


def _quantile_sigmoid(cfg: TimestepConfig, u: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(cfg.sigmoid_scale * _normal_ppf(u))


def _quantile_shift(cfg: TimestepConfig, u: torch.Tensor) -> torch.Tensor:
    return shift_time(_quantile_sigmoid(cfg, u), cfg.shift)


def _quantile_logsnr(cfg: TimestepConfig, u: torch.Tensor) -> torch.Tensor:
    # lambda = mean - std * ppf(u) is decreasing in u, so t = sigmoid(-lambda / 2) increases with u.
    return torch.sigmoid((cfg.logit_std * _normal_ppf(u) - cfg.logit_mean) / 2)


def _quantile_sigma_continuous(cfg: TimestepConfig, u: torch.Tensor) -> torch.Tensor:
    """musubi's weighting-scheme densities (before snapping to the 1000-step grid).

    musubi draws u' from the density and indexes the *descending* schedule, so t = 1 - u' (up to the grid):
    logit-normal u' = sigmoid(mean + std z) gives t = sigmoid(std z - mean) (a positive mean favours low noise).
    """
    if cfg.weighting_scheme == "logit_normal":
        return torch.sigmoid(cfg.logit_std * _normal_ppf(u) - cfg.logit_mean)
    if cfg.weighting_scheme == "mode":
        # SD3's u' = 1 - u - s(cos^2(pi u/2) - 1 + u); t = 1 - u' is increasing in u.
        return u + cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


_QUANTILES: dict[str, Callable[[TimestepConfig, torch.Tensor], torch.Tensor]] = {
    "uniform": lambda cfg, u: u,
    "sigmoid": _quantile_sigmoid,
    "shift": _quantile_shift,
    "logsnr": _quantile_logsnr,
    "sigma": _quantile_sigma_continuous,
}


def _inverse_quantile(cfg: TimestepConfig, t: float) -> float:
    """u with Q(u) = t, by bisection in float64 (Q is monotone increasing, Q(0) = 0, Q(1) = 1)."""
    quantile = _QUANTILES[cfg.mode]
    lo, hi = 0.0, 1.0
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        if float(quantile(cfg, torch.tensor(mid, dtype=torch.float64))) < t:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _snap_to_grid(cfg: TimestepConfig, t: torch.Tensor) -> torch.Tensor:
    """`sigma` mode: round t up to k/1000 with integer k inside [min_timestep, max_timestep] and k >= 1."""
    k_lo = max(1, math.ceil(cfg.min_timestep))
    k_hi = math.floor(cfg.max_timestep)
    k = torch.ceil(t * NUM_TRAIN_TIMESTEPS).clamp(k_lo, k_hi)
    return k / NUM_TRAIN_TIMESTEPS


def timesteps_from_uniform(cfg: TimestepConfig, u: torch.Tensor) -> torch.Tensor:
    """Map uniforms u in [0, 1] (e.g. stratified buckets) to timesteps of ``cfg`` inside its min/max range.

    u is first squeezed into ``[Q^-1(min/1000), Q^-1(max/1000)]``; computation is float64, result float32.
    """
    lo = cfg.min_timestep / NUM_TRAIN_TIMESTEPS
    hi = cfg.max_timestep / NUM_TRAIN_TIMESTEPS
    u_lo = _inverse_quantile(cfg, lo) if lo > 0 else 0.0
    u_hi = _inverse_quantile(cfg, hi) if hi < 1 else 1.0
    u = u_lo + (u_hi - u_lo) * u.to(torch.float64)
    t = _QUANTILES[cfg.mode](cfg, u).clamp(lo, hi)  # clamp only removes bisection round-off (~1e-16)
    if cfg.mode == "sigma":
        t = _snap_to_grid(cfg, t)
    return t.float()


def sample_timesteps(
    cfg: TimestepConfig,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``batch_size`` training times t (B,) float32 in ``[min_timestep/1000, max_timestep/1000]``.

    The uniforms are drawn on the generator's device (CPU by default) so a seed gives the same t everywhere.
    """
    gen_device = generator.device if generator is not None else "cpu"
    u = torch.rand(batch_size, generator=generator, device=gen_device, dtype=torch.float64)
    return timesteps_from_uniform(cfg, u).to(device or gen_device)


# ----------------------------------------------------------------------------------------------------------------
# training objective
# ----------------------------------------------------------------------------------------------------------------


def _per_sample(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """Broadcast a (B,) time over the non-batch dims of ``like``; scalars pass through."""
    if isinstance(t, torch.Tensor) and t.ndim == 1:
        return t.view(-1, *([1] * (like.ndim - 1)))
    return t


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """``x_t = (1 - t) * x0 + t * noise``; exact x0 at t = 0 and exact noise at t = 1.  Promoted dtype."""
    tb = _per_sample(t, x0)
    return (1 - tb) * x0 + tb * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target ``d x_t / dt = noise - x0``."""
    return noise - x0


def dit_time(t: torch.Tensor | float) -> torch.Tensor:
    """The DiT's time input: ``1000 * t`` in float32 (official convention; musubi's ``+1`` is not applied)."""
    return torch.as_tensor(t, dtype=torch.float32) * NUM_TRAIN_TIMESTEPS


# ----------------------------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------------------------


def sampling_sigmas(steps: int, scheduler_scale: float, device: torch.device | str | None = None) -> torch.Tensor:
    """The official time grid (steps + 1,) fp32 from 1 to 0: ``s*u / (1 + (s-1)*u)``, ``u = linspace(1, 0)``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    u = torch.linspace(1, 0, steps + 1, dtype=torch.float32, device=device)
    return scheduler_scale * u / (1 + (scheduler_scale - 1) * u)


def euler_step(
    x: torch.Tensor, v: torch.Tensor, t_cur: torch.Tensor | float, t_next: torch.Tensor | float
) -> torch.Tensor:
    """One explicit Euler step of dx/dt = v from t_cur to t_next (t_next < t_cur when denoising)."""
    return x + (t_next - t_cur) * v


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance ``v_uncond + w * (v_cond - v_uncond)``."""
    return v_uncond + w * (v_cond - v_uncond)


def needs_uncond(w: float) -> bool:
    """Whether guidance weight w needs the unconditional pass (official rule: ``|w - 1| > 1e-6``)."""
    return abs(w - 1.0) > 1e-6
