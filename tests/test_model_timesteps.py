"""The eq. 5 timestep sampler: quantiles against the closed form, mu = 0 uniform, range, determinism."""

import math

import torch

from model.timesteps import sample_timesteps, shift_timesteps


def _closed_form_step(quantile: float, mu: float, steps: int = 1000) -> float:
    # The paper's form: t' = e^mu / (e^mu + (T/t - 1)) * T with t = quantile * T.
    return math.exp(mu) / (math.exp(mu) + (1 / quantile - 1)) * steps


def test_quantiles_match_the_paper_formula_at_mu_1_5():
    steps = sample_timesteps(200_000, 1000, mu=1.5, generator=torch.Generator().manual_seed(0)).double()
    measured = torch.quantile(steps, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    expected = [_closed_form_step(q, 1.5) for q in (0.1, 0.5, 0.9)]
    for got, want, paper in zip(measured, expected, (330, 818, 976), strict=True):
        assert abs(got - want) <= 2.0
        assert abs(got - paper) <= 3.0


def test_mu_zero_is_uniform_and_the_shift_is_sd3_static_shift():
    u = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)
    assert torch.allclose(shift_timesteps(u, 0.0), u)
    shift = math.exp(1.5)
    assert torch.allclose(shift_timesteps(u, 1.5), shift * u / (1 + (shift - 1) * u))
    steps = sample_timesteps(100_000, 1000, mu=0.0, generator=torch.Generator().manual_seed(1)).double()
    assert abs(torch.quantile(steps, 0.5).item() - 500) < 10


def test_range_dtype_and_seed():
    first = sample_timesteps(4096, 50, mu=3.0, generator=torch.Generator().manual_seed(7))
    again = sample_timesteps(4096, 50, mu=3.0, generator=torch.Generator().manual_seed(7))
    assert first.dtype == torch.long
    assert torch.equal(first, again)
    assert int(first.min()) >= 0 and int(first.max()) == 49
