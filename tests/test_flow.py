"""kandinsky5.model.flow: interpolation edge cases, timestep modes and ranges, the sampling grid, Euler and CFG."""

from __future__ import annotations

import math

import pytest
import torch

from kandinsky5.model.flow import (
    TIMESTEP_MODES,
    TimestepConfig,
    cfg_combine,
    dit_time,
    euler_step,
    needs_uncond,
    noisy_input,
    sample_timesteps,
    sampling_sigmas,
    shift_time,
    timesteps_from_uniform,
    velocity_target,
)

N = 4000  # samples per distribution check
RANGES = [(0.0, 1000.0), (0.0, 300.0), (500.0, 1000.0), (200.0, 700.0), (990.0, 1000.0)]


def _reference_draw(cfg: TimestepConfig, n: int, seed: int = 123) -> torch.Tensor:
    """Independent forward formulas for each mode (no quantile functions), float64."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    if cfg.mode == "uniform":
        return u
    if cfg.mode == "sigmoid":
        return torch.sigmoid(cfg.sigmoid_scale * z)
    if cfg.mode == "shift":
        t = torch.sigmoid(cfg.sigmoid_scale * z)
        return cfg.shift * t / (1 + (cfg.shift - 1) * t)
    if cfg.mode == "logsnr":
        lam = cfg.logit_mean + cfg.logit_std * z
        return torch.sigmoid(-lam / 2)
    # sigma: musubi's density, index into the descending 1000..1 schedule
    if cfg.weighting_scheme == "logit_normal":
        d = torch.sigmoid(cfg.logit_mean + cfg.logit_std * z)
    elif cfg.weighting_scheme == "mode":
        d = 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        d = u
    index = torch.floor(d * 1000).clamp(0, 999)
    return (1000 - index) / 1000


def _configs() -> list[TimestepConfig]:
    return [
        TimestepConfig(mode="uniform"),
        TimestepConfig(mode="sigmoid", sigmoid_scale=1.5),
        TimestepConfig(mode="shift", shift=5.0),
        TimestepConfig(mode="shift", shift=3.0, sigmoid_scale=0.8),
        TimestepConfig(mode="logsnr", logit_mean=-1.0, logit_std=2.0),
        TimestepConfig(mode="sigma"),
        TimestepConfig(mode="sigma", logit_mean=1.0, logit_std=1.2),
        TimestepConfig(mode="sigma", weighting_scheme="mode", mode_scale=1.29),
        TimestepConfig(mode="sigma", weighting_scheme="uniform"),
    ]


def _cfg_id(cfg: TimestepConfig) -> str:
    return f"{cfg.mode}-{cfg.weighting_scheme if cfg.mode == 'sigma' else cfg.shift}-{cfg.logit_mean}"


# ---- interpolation --------------------------------------------------------------------------------------------


def test_noisy_input_edges_exact():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, 16, generator=g)
    eps = torch.randn(3, 2, 4, 4, 16, generator=g)
    xt = noisy_input(x0, eps, torch.tensor([0.0, 1.0, 0.25]))
    assert torch.equal(xt[0], x0[0])
    assert torch.equal(xt[1], eps[1])
    torch.testing.assert_close(xt[2], 0.75 * x0[2] + 0.25 * eps[2])
    assert torch.equal(noisy_input(x0, eps, 0.0), x0)
    assert torch.equal(noisy_input(x0, eps, 1.0), eps)


def test_velocity_is_time_derivative_and_dit_time():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 8, generator=g, dtype=torch.float64), torch.randn(2, 8, generator=g, dtype=torch.float64)
    t, h = torch.tensor([0.3, 0.7], dtype=torch.float64), 1e-6
    fd = (noisy_input(x0, eps, t + h) - noisy_input(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(fd, velocity_target(x0, eps))
    time = dit_time(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert time.dtype == torch.float32 and time.tolist() == [0.0, 500.0, 1000.0]


# ---- timestep sampling ----------------------------------------------------------------------------------------


def test_unknown_mode_lists_modes():
    with pytest.raises(ValueError, match="valid modes: " + ", ".join(TIMESTEP_MODES)):
        TimestepConfig(mode="bogus_shift")
    with pytest.raises(ValueError, match="min_timestep"):
        TimestepConfig(min_timestep=600, max_timestep=500)


@pytest.mark.parametrize("cfg", _configs(), ids=_cfg_id)
def test_distribution_matches_reference(cfg):
    g = torch.Generator().manual_seed(7)
    t = sample_timesteps(cfg, N, generator=g)
    assert t.shape == (N,) and t.dtype == torch.float32
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    ref = _reference_draw(cfg, 200_000)
    assert abs(float(t.double().mean() - ref.mean())) < 0.015
    for q in (0.1, 0.5, 0.9):
        assert abs(float(torch.quantile(t.double(), q) - torch.quantile(ref, q))) < 0.03


@pytest.mark.parametrize("cfg", _configs(), ids=_cfg_id)
@pytest.mark.parametrize("lo,hi", RANGES)
def test_min_max_range_honoured_in_every_mode(cfg, lo, hi):
    import dataclasses

    cfg = dataclasses.replace(cfg, min_timestep=lo, max_timestep=hi)
    t = sample_timesteps(cfg, N, generator=torch.Generator().manual_seed(3))
    assert float(t.min()) >= float(torch.tensor(lo / 1000, dtype=torch.float32))
    assert float(t.max()) <= float(torch.tensor(hi / 1000, dtype=torch.float32))
    # the shape inside the range is the mode's own distribution conditioned on the range (not squashed)
    ref = _reference_draw(cfg, 400_000)
    ref = ref[(ref >= lo / 1000) & (ref <= hi / 1000)]
    if ref.numel() > 2000:
        width = (hi - lo) / 1000
        assert abs(float(t.double().mean() - ref.mean())) < 0.03 * width + 2e-3


def test_sigma_mode_integer_times_and_not_inverted():
    cfg = TimestepConfig(mode="sigma", min_timestep=500, max_timestep=1000)
    t = sample_timesteps(cfg, N, generator=torch.Generator().manual_seed(5))
    k = t.double() * 1000
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert float(t.min()) >= 0.5  # musubi (defect #21) would give the low-noise half here


def test_uniform_buckets_are_monotone():
    cfg = TimestepConfig(mode="shift", min_timestep=100, max_timestep=900)
    u = torch.linspace(0, 1, 101)
    t = timesteps_from_uniform(cfg, u)
    assert torch.all(t[1:] >= t[:-1])
    assert math.isclose(float(t[0]), 0.1, abs_tol=1e-6) and math.isclose(float(t[-1]), 0.9, abs_tol=1e-6)


def test_seeded_sampling_is_reproducible():
    cfg = TimestepConfig()
    a = sample_timesteps(cfg, 16, generator=torch.Generator().manual_seed(11))
    b = sample_timesteps(cfg, 16, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b)


def test_shift_is_monotone_and_fixes_endpoints():
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    for s in (0.5, 1.0, 3.0, 5.0, 10.0):
        st = shift_time(t, s)
        assert torch.all(st[1:] > st[:-1])
        assert float(st[0]) == 0.0 and float(st[-1]) == 1.0
        if s > 1:
            assert torch.all(st >= t)


# ---- sampling ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps,scale", [(50, 5.0), (50, 10.0), (16, 5.0), (1, 3.0)])
def test_sampling_sigmas_exact(steps, scale):
    sig = sampling_sigmas(steps, scale)
    assert sig.shape == (steps + 1,) and sig.dtype == torch.float32
    u = torch.linspace(1, 0, steps + 1)  # line-by-line official generation_utils
    expected = scale * u / (1 + (scale - 1) * u)
    assert torch.equal(sig, expected)
    u64 = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    torch.testing.assert_close(sig.double(), scale * u64 / (1 + (scale - 1) * u64), rtol=0, atol=3e-7)
    assert float(sig[0]) == 1.0 and float(sig[-1]) == 0.0
    assert torch.all(sig[1:] < sig[:-1])


def test_euler_constant_velocity_lands_on_x0():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 3, 8, 8, 16, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 3, 8, 8, 16, generator=g, dtype=torch.float64)
    sig = sampling_sigmas(20, 5.0).double()
    x = eps.clone()
    for k in range(20):
        x = euler_step(x, velocity_target(x0, eps), sig[k], sig[k + 1])
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-12)


def test_euler_straight_path_field_exact():
    """v(x, t) = (x - x0) / t is the straight-path velocity field: Euler follows the line and lands on x0."""
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(4, 16, generator=g)
    x = torch.randn(4, 16, generator=g)
    sig = sampling_sigmas(10, 5.0)
    for k in range(10):
        x = euler_step(x, (x - x0) / sig[k], sig[k], sig[k + 1])
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-6)


def test_cfg_combine_and_needs_uncond():
    vc, vu = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(cfg_combine(vc, vu, 5.0), torch.tensor([6.0, -9.0]))
    assert torch.equal(cfg_combine(vc, vu, 1.0), vc)
    assert not needs_uncond(1.0) and not needs_uncond(1.0 + 5e-7)
    assert needs_uncond(5.0) and needs_uncond(0.0)


@pytest.mark.parametrize("field", ["shift", "sigmoid_scale", "logit_std", "logit_mean"])
def test_non_finite_timestep_settings_are_refused(field):
    """NaN passed ``<= 0`` checks and surfaced as a NaN loss at the first step."""
    with pytest.raises(ValueError, match=field):
        TimestepConfig(**{field: float("nan")})
