"""Our numbers against the references' formulas, retyped here from their equations.

Each reference below is written the way lfads-torch (and NLB, scikit-learn) state it, in
their own parametrisation, independently of ours: the AR(1) prior of the inferred inputs,
the coordinated-dropout gradient mask, sample validation's scaling, the L2 penalty, the IC
KL, bits per spike and R2. On random inputs, ours must give the same values and gradients.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Independent, Normal, kl_divergence

from src.metrics import r2, region_bps
from src.model import ar1_logprob
from tests.test_model import counts, small_model, with_leaf_log_rates

# -----------------------------------------------------------------------------
# the references, retyped


def ar1_logprob_reference(u, tau, nvar):
    """lfads-torch's AutoregressiveMultivariateNormal.log_prob: u_0 ~ N(0, nvar / (1 - a^2)),
    u_t ~ N(a u_{t-1}, nvar), a = exp(-1 / tau), an Independent Normal over (time, dims)."""
    alphas = torch.exp(-1.0 / tau)
    pvar = nvar / (1 - alphas**2)  # the process' stationary variance
    means = alphas * torch.roll(u, shifts=1, dims=1)
    stds = torch.ones_like(means) * nvar.sqrt()
    means[:, 0], stds[:, 0] = 0.0, pvar.sqrt()
    return Independent(Normal(means, stds), 2).log_prob(u)


def pad_mask(mask, like, value):
    """A (B, T_enc, N_in) mask padded to (B, T_rec, N) with `value`, as lfads-torch pads."""
    pad = (0, like.shape[2] - mask.shape[2], 0, like.shape[1] - mask.shape[1])
    return F.pad(mask, pad, value=value)


def coordinated_dropout_reference(recon_loss, cd_mask):
    """lfads-torch's CoordinatedDropout.process_losses: gradient only through the elements
    that were dropped from the input (cd_mask 1 = kept); the loss value is unchanged."""
    grad_mask = pad_mask(1.0 - cd_mask, recon_loss, 1.0)
    return recon_loss * grad_mask + (recon_loss * (1 - grad_mask)).detach()


def sample_validation_reference(recon_loss, sv_mask, sv_rate):
    """lfads-torch's SampleValidation.process_losses (summed per trial): the kept elements
    (sv_mask 1) scaled by 1 / (1 - rate), the held-out ones logged, scaled by 1 / rate."""
    heldin = recon_loss * pad_mask(sv_mask / (1 - sv_rate), recon_loss, 1.0)
    t_enc, n_in = sv_mask.shape[1:]
    heldout = recon_loss[:, :t_enc, :n_in] * (1 - sv_mask) / sv_rate
    return heldin.sum((1, 2)).mean(), heldout.sum((1, 2)).mean()


def l2_reference(pairs):
    """lfads-torch's compute_l2_penalty (and TF LFADS's): sum of scale * 0.5 * ||W||^2 over
    the matrices with a positive scale, divided by their total number of entries."""
    penalty, size = 0.0, 0
    for w, scale in pairs:
        if scale > 0:
            penalty += scale * 0.5 * torch.norm(w, 2) ** 2
            size += w.numel()
    return penalty / (size + 1e-8)


def bits_per_spike_reference(log_rates, k):
    """lfads-torch's bits_per_spike (NLB's definition): Poisson NLLs with Stirling's term,
    the null model each neuron's mean count over the region."""
    nll_model = F.poisson_nll_loss(log_rates, k, full=True, reduction="sum")
    nll_null = F.poisson_nll_loss(k.mean((0, 1), keepdim=True).expand_as(k), k,
                                  log_input=False, full=True, reduction="sum")
    return ((nll_null - nll_model) / k.sum() / math.log(2)).item()


def r2_reference(pred, truth):
    """lfads-torch's r2_score: per neuron over all trials and bins, averaged over neurons."""
    pred, truth = pred.reshape(-1, pred.shape[-1]), truth.reshape(-1, truth.shape[-1])
    ss_tot = ((truth - truth.mean(0)) ** 2).sum(0)
    ss_res = ((truth - pred) ** 2).sum(0)
    return (1 - ss_res / ss_tot).mean().item()


# -----------------------------------------------------------------------------
# ours against them


@pytest.mark.parametrize("tau,nvar", [(10.0, 0.1), (2.0, 0.1), (50.0, 0.5), (1.5, 1.0)])
def test_ar1_logprob_equals_lfads_torch(tau, nvar):
    torch.manual_seed(0)
    u = torch.randn(6, 30, 3, dtype=torch.float64)
    tau_t = torch.tensor([tau, tau * 2, tau / 2 + 1], dtype=torch.float64)
    nvar_t = torch.tensor([nvar, nvar * 3, nvar / 2], dtype=torch.float64)
    ours = ar1_logprob(u, tau_t.log(), nvar_t.log())
    torch.testing.assert_close(ours, ar1_logprob_reference(u, tau_t, nvar_t))


def test_the_model_prior_at_its_defaults_equals_lfads_torch():
    m = small_model(co_dim=4)  # the default co_prior_tau 10 and co_prior_nvar 0.1
    u = torch.randn(5, 13, 4)
    ours = ar1_logprob(u, m.co_prior_log_tau, m.co_prior_log_nvar)
    ref = ar1_logprob_reference(u, torch.full((4,), 10.0), torch.full((4,), 0.1))
    torch.testing.assert_close(ours, ref)


def test_coordinated_dropout_equals_lfads_torch():
    m = small_model(dropout=0.0)
    out, log_rates, rec = with_leaf_log_rates(m, 4)
    keep = torch.rand(4, 10, 6, generator=torch.Generator().manual_seed(3)) >= 0.3
    ours = m.losses(out, rec, cd_keep=keep)["recon"]
    nll = torch.exp(log_rates) - rec * log_rates + torch.lgamma(rec + 1)
    ref = coordinated_dropout_reference(nll, keep.float()).sum((1, 2)).mean()
    torch.testing.assert_close(ours, ref)
    g_ours, = torch.autograd.grad(ours, log_rates)
    g_ref, = torch.autograd.grad(ref, log_rates)
    torch.testing.assert_close(g_ours, g_ref)


def test_sample_validation_scaling_equals_lfads_torch():
    m = small_model(dropout=0.0, sv_rate=0.2)
    enc, rec = counts(4, 10, 6), counts(4, 13, 8, seed=1)
    out = m(enc, sample=False)
    sv = torch.rand(4, 10, 6, generator=torch.Generator().manual_seed(4)) < 0.2  # True: held out
    ours = m.losses(out, rec, sv_mask=sv)
    nll = torch.exp(out.log_rates) - rec * out.log_rates + torch.lgamma(rec + 1)
    heldin, heldout = sample_validation_reference(nll, (~sv).float(), 0.2)
    torch.testing.assert_close(ours["recon"], heldin)
    torch.testing.assert_close(ours["recon_sv"], heldout)


@pytest.mark.parametrize("gen,con", [(2000.0, 0.0), (2000.0, 500.0), (0.0, 10.0), (0.0, 0.0)])
def test_l2_penalty_equals_lfads_torch(gen, con):
    m = small_model(l2_gen_scale=gen, l2_con_scale=con)
    ref = l2_reference([(m.gen.weight_hh, gen), (m.con.weight_hh, con)])
    torch.testing.assert_close(m.l2_penalty(), torch.as_tensor(ref, dtype=torch.float32))


def test_ic_kl_equals_torch_distributions():
    m = small_model()
    out = m(counts(5, 10, 6), counts(5, 13, 8))
    q = Independent(Normal(out.ic_mean, out.ic_std), 1)
    p = Independent(Normal(m.ic_prior_mean, math.sqrt(m.cfg.ic_prior_var)), 1)
    torch.testing.assert_close(out.losses["kl_ic"], kl_divergence(q, p).mean())


def test_regional_bits_per_spike_equals_lfads_torch():
    g = torch.Generator().manual_seed(0)
    rates = torch.rand(30, 20, 9, generator=g, dtype=torch.float64) * 3 + 0.05
    k = torch.poisson(rates, generator=g)
    pred = rates * torch.exp(0.3 * torch.randn(rates.shape, generator=g, dtype=torch.float64))
    ours = region_bps(pred.numpy(), k.numpy(), n_in=6, t_enc=15)
    lr = pred.log()
    ref = {"bps": bits_per_spike_reference(lr[:, :15, :6], k[:, :15, :6]),
           "co_bps": bits_per_spike_reference(lr[:, :15, 6:], k[:, :15, 6:]),
           "fp_bps": bits_per_spike_reference(lr[:, 15:], k[:, 15:])}
    assert ours == pytest.approx(ref, rel=1e-6)  # torch adds 1e-8 inside the null's log


def test_r2_equals_lfads_torch_and_scikit_learn():
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(0)
    truth = rng.gamma(2.0, 1.0, size=(15, 12, 7))
    pred = truth + rng.normal(scale=0.5, size=truth.shape)
    mean, pooled = r2(pred, truth)
    assert mean == pytest.approx(r2_reference(torch.tensor(pred), torch.tensor(truth)))
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    assert mean == pytest.approx(r2_score(flat(truth), flat(pred)))
    # pooled: one R2 over every element, each neuron's own mean removed
    sse = ((pred - truth) ** 2).sum()
    assert pooled == pytest.approx(1 - sse / ((flat(truth) - flat(truth).mean(0)) ** 2).sum())


def test_r2_of_a_neuron_with_constant_truth_is_finite():
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(1)
    truth = rng.gamma(2.0, 1.0, size=(10, 8, 3))
    truth[..., 1] = 0.7  # never varies
    pred = truth + rng.normal(scale=0.3, size=truth.shape)
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    mean, pooled = r2(pred, truth)
    assert math.isfinite(mean) and math.isfinite(pooled)
    # scikit-learn's convention: such a neuron scores 0 unless predicted exactly
    assert mean == pytest.approx(r2_score(flat(truth), flat(pred)))
    exact = pred.copy()
    exact[..., 1] = 0.7
    per_neuron = r2_score(flat(truth), flat(exact), multioutput="raw_values")
    assert per_neuron[1] == 1.0 and r2(exact, truth)[0] == pytest.approx(per_neuron.mean())
    assert r2(np.full_like(truth, 0.7)[..., 1:2], truth[..., 1:2]) == (1.0, 1.0)
