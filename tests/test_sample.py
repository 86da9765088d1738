"""LFADS.sample: trials drawn from the priors through the generator."""

import math

import torch

from src.model import LFADS, LFADSConfig


def model(co_dim=2, tau=5.0, nvar=0.2) -> LFADS:
    torch.manual_seed(0)
    cfg = LFADSConfig(n_in=6, n_out=8, t_enc=12, t_rec=12, ic_enc_dim=8, ci_enc_dim=8,
                      con_dim=8, co_dim=co_dim, ic_dim=3, gen_dim=16, fac_dim=4,
                      co_prior_tau=tau, co_prior_nvar=nvar, ic_prior_var=0.1)
    m = LFADS(cfg)
    with torch.no_grad():
        m.ic_prior_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    return m


def test_shapes_and_positive_rates():
    out = model().sample(5)
    assert out["rates"].shape == (5, 12, 8) and out["factors"].shape == (5, 12, 4)
    assert out["ic"].shape == (5, 3) and out["inputs"].shape == (5, 12, 2)
    assert (out["rates"] > 0).all()
    assert model(co_dim=0).sample(2)["inputs"] is None


def test_the_samples_have_the_priors_statistics():
    n, tau, nvar = 40000, 5.0, 0.2
    out = model(tau=tau, nvar=nvar).sample(n, torch.Generator().manual_seed(1))
    z, u = out["ic"], out["inputs"]  # (n, 3), (n, T, 2)
    # the IC prior N(mean, 0.1): standard errors of mean and variance ~0.0016 and ~0.0007
    assert torch.allclose(z.mean(0), torch.tensor([0.5, -1.0, 2.0]), atol=0.01)
    assert torch.allclose(z.var(0), torch.full((3,), 0.1), atol=0.005)
    # the AR(1) prior, stationary from u_0: variance nvar / (1 - a^2) at every step, mean 0,
    # and the correlation of consecutive steps a = exp(-1/tau) (hand values: a 0.8187)
    a = math.exp(-1 / tau)
    stationary = nvar / (1 - a**2)  # 0.6033
    assert abs(u.mean()) < 0.01
    assert torch.allclose(u.var(0), torch.full_like(u[0], stationary), rtol=0.05)
    lag1 = (u[:, 1:] * u[:, :-1]).mean() / u.var()
    assert abs(lag1 - a) < 0.01
    innovations = u[:, 1:] - a * u[:, :-1]
    assert abs(innovations.var() - nvar) < 0.005


def test_the_factors_follow_the_generator_from_the_sampled_ic():
    """Without inputs the trial is the generator's response to z alone: rerun it by hand."""
    m = model(co_dim=0)
    out = m.sample(3, torch.Generator().manual_seed(2))
    g = m.ic_to_g0(out["ic"])
    w = torch.nn.functional.normalize(m.fac.weight, dim=1)
    for t in range(12):
        g = m.gen(torch.zeros(3, 0), g).clamp(-m.cfg.cell_clip, m.cfg.cell_clip)
        assert torch.allclose(out["factors"][:, t], g @ w.T, atol=1e-6)
    assert torch.allclose(out["rates"], torch.exp(m.readout(out["factors"])), atol=1e-6)
