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

musubi's resolution-dependent modes (``flux_shift``, ``flux2_shift``, ``qwen_shift``, ``krea2_shift``,
``ideogram4_shift``) take the batch's latent size ``latent_hw = (h, w)`` (all items of a bucketed batch share it);
the ``qinglong_*`` mixtures draw a component per sample (weights re-normalised by each component's mass inside the
range, so the result is the mixture conditioned on the range).  ``loss_weight`` gives musubi's SD3 loss weights
(``--weighting_scheme sigma_sqrt`` / ``cosmap``).

Sampling (``sampling_sigmas`` / ``euler_step`` / ``cfg_combine``)
-----------------------------------------------------------------
The official grid: ``u = linspace(1, 0, steps + 1)``, ``t = s*u / (1 + (s - 1)*u)`` with ``s = scheduler_scale``,
evaluated in fp32 in exactly that operation order; explicit Euler ``x <- x + (t_next - t_cur) * v``; classifier-free
guidance ``v_u + w (v_c - v_u)`` with the unconditional pass skipped when ``|w - 1| <= 1e-6``.
"""

from __future__ import annotations

import dataclasses
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
    "loss_weight",
    "resolution_shift",
    "shift_time",
    "noisy_input",
    "velocity_target",
    "dit_time",
    "sampling_sigmas",
    "euler_step",
    "cfg_combine",
    "needs_uncond",
]

# musubi's resolution-dependent shift: mu linear in a token count, shift = exp(mu): (x1, y1, x2, y2, count)
# where count "patches" = (h // 2) * (w // 2) of the latent, "latent" = h * w
_SHIFT_LINES = {
    "flux_shift": (256, 0.5, 4096, 1.15, "patches"),
    "flux2_shift": (256, 0.5, 4096, 1.15, "latent"),
    "qwen_shift": (256, 0.5, 8192, 0.9, "patches"),
    "krea2_shift": (256, 0.5, 6400, 1.15, "patches"),
}
# musubi's qinglong mixtures: (weight, component mode, (logit_mean, logit_std) or None = the configured ones)
_MIXTURES = {
    "qinglong_flux": ((0.79, "flux_shift", None), (0.11, "logsnr", None), (0.10, "logsnr", (5.36, 1.0))),
    "qinglong_qwen": ((0.95, "qwen_shift", None), (0.05, "logsnr", (5.36, 1.0))),
}
TIMESTEP_MODES = ("uniform", "sigmoid", "shift", "logsnr", "sigma", *_SHIFT_LINES, "ideogram4_shift", *_MIXTURES)
RESOLUTION_MODES = (*_SHIFT_LINES, "ideogram4_shift", *_MIXTURES)  # need the batch's latent (h, w)
LOSS_WEIGHTINGS = ("sigma_sqrt", "cosmap")  # musubi's SD3 loss weights; as a `sigma` density they mean uniform
WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform", *LOSS_WEIGHTINGS)  # musubi --weighting_scheme
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
      * ``flux_shift``, ``flux2_shift``, ``qwen_shift``, ``krea2_shift``  mode ``shift`` with
        ``shift = exp(mu)``, mu linear in the latent's token count (:func:`resolution_shift`), as musubi
      * ``ideogram4_shift``  t = sigmoid(0.5 ln(16h * 16w / 512^2) + 1.5 z), clamped as musubi does
      * ``qinglong_flux``  79 % flux_shift, 11 % logsnr(logit_mean, logit_std), 10 % logsnr(5.36, 1);
        ``qinglong_qwen``  95 % qwen_shift, 5 % logsnr(5.36, 1)
    ``weighting_scheme`` ``sigma_sqrt`` / ``cosmap`` weight the loss (:func:`loss_weight`, any mode) and draw the
    ``sigma`` mode uniformly, as in musubi.
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
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)}")
        if not math.isfinite(self.logit_mean):
            raise ValueError(f"logit_mean must be a finite number, got {self.logit_mean}")
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


def resolution_shift(mode: str, latent_hw: tuple[int, int] | None) -> float:
    """musubi's ``exp(mu)`` of a resolution-dependent mode for a latent of ``latent_hw`` = (h, w) (VAE units)."""
    if latent_hw is None:
        raise ValueError(f"timestep mode {mode!r} depends on the latent size: pass latent_hw=(h, w)")
    x1, y1, x2, y2, count = _SHIFT_LINES[mode]
    h, w = latent_hw
    x = (h // 2) * (w // 2) if count == "patches" else h * w
    return math.exp(y1 + (y2 - y1) / (x2 - x1) * (x - x1))


def _quantile_ideogram4(u: torch.Tensor, latent_hw: tuple[int, int] | None) -> torch.Tensor:
    if latent_hw is None:
        raise ValueError("timestep mode 'ideogram4_shift' depends on the latent size: pass latent_hw=(h, w)")
    h, w = latent_hw
    mean = 0.5 * math.log(16 * h * 16 * w / (512 * 512))
    t = torch.sigmoid(mean + 1.5 * _normal_ppf(u))
    return t.clamp(1.0 / (1 + math.exp(7.5)), 1.0 - 1.0 / (1 + math.exp(9.0)))


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


def _quantile(cfg: TimestepConfig, u: torch.Tensor, latent_hw: tuple[int, int] | None) -> torch.Tensor:
    """Q(u) of a single (non-mixture) mode."""
    if cfg.mode in _SHIFT_LINES:
        return shift_time(_quantile_sigmoid(cfg, u), resolution_shift(cfg.mode, latent_hw))
    if cfg.mode == "ideogram4_shift":
        return _quantile_ideogram4(u, latent_hw)
    return _QUANTILES[cfg.mode](cfg, u)


def _components(cfg: TimestepConfig) -> list[tuple[float, TimestepConfig]]:
    """(weight, single-mode config) of a mixture mode; ``[(1, cfg)]`` otherwise."""
    if cfg.mode not in _MIXTURES:
        return [(1.0, cfg)]
    out = []
    for weight, mode, params in _MIXTURES[cfg.mode]:
        mean, std = params or (cfg.logit_mean, cfg.logit_std)
        out.append((weight, dataclasses.replace(cfg, mode=mode, logit_mean=mean, logit_std=std)))
    return out


def _inverse_quantile(cfg: TimestepConfig, t: float, latent_hw: tuple[int, int] | None = None) -> float:
    """u with Q(u) = t, by bisection in float64 (Q is monotone non-decreasing on [0, 1])."""
    lo, hi = 0.0, 1.0
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        if float(_quantile(cfg, torch.tensor(mid, dtype=torch.float64), latent_hw)) < t:
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


def _u_range(cfg: TimestepConfig, latent_hw: tuple[int, int] | None) -> tuple[float, float]:
    """``[Q^-1(min/1000), Q^-1(max/1000)]`` of a single mode."""
    lo, hi = cfg.min_timestep / NUM_TRAIN_TIMESTEPS, cfg.max_timestep / NUM_TRAIN_TIMESTEPS
    u_lo = _inverse_quantile(cfg, lo, latent_hw) if lo > 0 else 0.0
    u_hi = _inverse_quantile(cfg, hi, latent_hw) if hi < 1 else 1.0
    return u_lo, u_hi


def timesteps_from_uniform(
    cfg: TimestepConfig,
    u: torch.Tensor,
    latent_hw: tuple[int, int] | None = None,
    pick: torch.Tensor | None = None,
) -> torch.Tensor:
    """Map uniforms u in [0, 1] (e.g. stratified buckets) to timesteps of ``cfg`` inside its min/max range.

    u is first squeezed into ``[Q^-1(min/1000), Q^-1(max/1000)]``; computation is float64, result float32.
    ``latent_hw``: the latent (h, w) for the resolution-dependent modes.  ``pick``: uniforms choosing the component
    of a mixture mode (components weighted by their mass inside the range).
    """
    lo, hi = cfg.min_timestep / NUM_TRAIN_TIMESTEPS, cfg.max_timestep / NUM_TRAIN_TIMESTEPS
    parts = [(weight, part, _u_range(part, latent_hw)) for weight, part in _components(cfg)]
    u = u.to(torch.float64)
    which = torch.zeros(u.shape, dtype=torch.long, device=u.device)
    if len(parts) > 1:
        if pick is None:
            raise ValueError(f"timestep mode {cfg.mode!r} is a mixture: pass pick (uniforms choosing a component)")
        mass = torch.tensor([w * (b - a) for w, _, (a, b) in parts], dtype=torch.float64, device=u.device)
        edges = torch.cumsum(mass / mass.sum(), 0)
        which = torch.searchsorted(edges, pick.to(torch.float64), right=True).clamp(max=len(parts) - 1)
    t = torch.empty_like(u)
    for k, (_, part, (a, b)) in enumerate(parts):
        sel = which == k
        t[sel] = _quantile(part, a + (b - a) * u[sel], latent_hw)
    t = t.clamp(lo, hi)  # clamp only removes bisection round-off (~1e-16)
    if cfg.mode == "sigma":
        t = _snap_to_grid(cfg, t)
    return t.float()


def sample_timesteps(
    cfg: TimestepConfig,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    latent_hw: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Draw ``batch_size`` training times t (B,) float32 in ``[min_timestep/1000, max_timestep/1000]``.

    The uniforms are drawn on the generator's device (CPU by default) so a seed gives the same t everywhere.
    ``latent_hw`` = the batch's latent (h, w), needed by the resolution-dependent modes.
    """
    gen_device = generator.device if generator is not None else "cpu"
    u = torch.rand(batch_size, generator=generator, device=gen_device, dtype=torch.float64)
    pick = None
    if cfg.mode in _MIXTURES:
        pick = torch.rand(batch_size, generator=generator, device=gen_device, dtype=torch.float64)
    return timesteps_from_uniform(cfg, u, latent_hw, pick).to(device or gen_device)


def loss_weight(cfg: TimestepConfig, t: torch.Tensor) -> torch.Tensor | None:
    """musubi's SD3 loss weight per sample (B,) fp32 for ``weighting_scheme`` ``sigma_sqrt`` (1 / sigma^2) or
    ``cosmap`` (2 / (pi (1 - 2 sigma + 2 sigma^2))), sigma = t (at least 1/1000, musubi's smallest grid value);
    None (no weighting) for the other schemes."""
    if cfg.weighting_scheme not in LOSS_WEIGHTINGS:
        return None
    sigma = t.float().clamp_min(1.0 / NUM_TRAIN_TIMESTEPS)
    if cfg.weighting_scheme == "sigma_sqrt":
        return sigma**-2.0
    return 2.0 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))


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
