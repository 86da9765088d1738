"""The model's parts against trusted references: torch's GRU, Monte Carlo, direct densities."""

import math

import numpy as np
import pytest
import torch

from src.metrics import bits_per_spike, r2, region_bps
from src.model import LFADS, LFADSConfig, ar1_logprob, bidirectional, gru_cell, kl_normal
from src.scan import gate
from src.trainer import ramp

SIZES = dict(n_in=6, n_out=8, t_enc=10, t_rec=13)


def small_model(**kw) -> LFADS:
    torch.manual_seed(0)
    cfg = dict(SIZES, ic_enc_dim=8, ci_enc_dim=8, con_dim=8, co_dim=2, ic_dim=4, gen_dim=16,
               fac_dim=5)
    cfg.update(kw)
    return LFADS(LFADSConfig(**cfg))


def counts(b, t, n, seed=0):
    return torch.poisson(torch.full((b, t, n), 1.5), generator=torch.Generator().manual_seed(seed))


def test_gru_step_matches_torch():
    torch.manual_seed(0)
    cell = torch.nn.GRUCell(5, 7)
    x, h = torch.randn(3, 5), torch.randn(3, 7)
    ours, rz, n = torch.empty(3, 7), torch.empty(3, 14), torch.empty(3, 7)  # written by gate
    with torch.no_grad():  # the scans call it unrecorded
        gate(torch.nn.functional.linear(x, cell.weight_ih, cell.bias_ih),
             torch.nn.functional.linear(h, cell.weight_hh, cell.bias_hh), h, 1e30, ours, rz, n)
    torch.testing.assert_close(ours, cell(x, h))


def test_encoders_match_torch_bidirectional_gru():
    # every direction of two GRUs stepped in one scan equals torch.nn.GRU on each, and so do
    # the gradients of inputs and weights
    torch.manual_seed(0)
    grus = [torch.nn.GRU(5, 6, batch_first=True, bidirectional=True) for _ in range(2)]
    x = torch.randn(3, 9, 5, requires_grad=True)
    w = torch.randn(3, 9, 12)
    ours = [o.transpose(0, 1) for o in bidirectional(grus, x)]  # time first -> batch first
    torch.autograd.backward([(o * w).sum() for o in ours])
    ours_grads = [x.grad.clone()] + [p.grad.clone() for g in grus for p in g.parameters()]
    x.grad = None
    for g in grus:
        g.zero_grad()
    ref = [g(x)[0] for g in grus]
    torch.autograd.backward([(r * w).sum() for r in ref])
    ref_grads = [x.grad] + [p.grad for g in grus for p in g.parameters()]
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r)
    for o, r in zip(ours_grads, ref_grads):
        torch.testing.assert_close(o, r)
    with torch.no_grad():  # without a backward the encoders are torch's GRU: the same states
        for o, r in zip(bidirectional(grus, x), ours):
            o = o.transpose(0, 1)
            torch.testing.assert_close(o, r)


def test_gate_biases_start_at_one():
    cell = gru_cell(5, 7)
    assert torch.all(cell.bias_ih[:14] == 1.0)
    assert not torch.all(cell.bias_ih[14:] == 1.0)


def test_kl_normal_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mq, vq, mp, vp = torch.tensor(0.3), torch.tensor(0.5), torch.tensor(-0.2), torch.tensor(0.1)
    x = mq + vq.sqrt() * torch.randn(2_000_000, generator=g, dtype=torch.float64)
    log_q = torch.distributions.Normal(mq, vq.sqrt()).log_prob(x)
    log_p = torch.distributions.Normal(mp, vp.sqrt()).log_prob(x)
    mc = (log_q - log_p).mean()
    assert abs(kl_normal(mq, vq, mp, vp).item() - mc.item()) < 0.01
    assert kl_normal(mp, vp, mp, vp).item() == pytest.approx(0.0, abs=1e-7)


def test_ar1_logprob_matches_gaussian_with_ar1_covariance():
    torch.manual_seed(0)
    T, U = 12, 3
    tau, nvar = torch.tensor([2.0, 5.0, 20.0]), torch.tensor([0.1, 0.5, 1.0])
    u = torch.randn(4, T, U, dtype=torch.float64)
    ours = ar1_logprob(u, tau.log().double(), nvar.log().double())
    lags = (torch.arange(T)[:, None] - torch.arange(T)[None]).abs().double()
    direct = 0
    for d in range(U):
        alpha = math.exp(-1 / tau[d].item())
        # stationary AR(1) with innovation variance nvar: marginal nvar / (1 - alpha^2), and
        # covariance marginal * alpha^|i - j|
        cov = nvar[d].double() / (1 - alpha**2) * alpha**lags
        mvn = torch.distributions.MultivariateNormal(torch.zeros(T, dtype=torch.float64), cov)
        direct = direct + mvn.log_prob(u[:, :, d])
    torch.testing.assert_close(ours, direct)


def test_ar1_prior_starts_at_the_references_innovation_variance():
    m = small_model(co_dim=3)
    torch.testing.assert_close(m.co_prior_log_nvar.exp(), torch.full((3,), 0.1))
    # a jump of size 1 from rest in the last bin costs 0.5 / 0.1 = 5 nats more than staying
    # at 0, as in the references; with 0.1 as the stationary variance it would cost 28
    u = torch.zeros(1, 3, 3, dtype=torch.float64)
    jump = u.clone()
    jump[:, 2] = 1.0
    lt, ln = m.co_prior_log_tau.double(), m.co_prior_log_nvar.double()
    cost = (ar1_logprob(u, lt, ln) - ar1_logprob(jump, lt, ln)).item() / 3  # per dimension
    assert cost == pytest.approx(0.5 / 0.1)


def test_ramp_end_points():
    assert ramp(0, 0, 100) == 0.0
    assert ramp(50, 0, 100) == 0.5
    assert ramp(100, 0, 100) == 1.0
    assert ramp(10_000, 0, 100) == 1.0
    assert ramp(99, 100, 50) == 0.0 and ramp(125, 100, 50) == 0.5
    assert ramp(0, 0, 0) == 1.0


def test_shapes_and_loss_terms():
    m = small_model()
    out = m(counts(5, 10, 6), counts(5, 13, 8))
    assert out.log_rates.shape == (5, 13, 8)
    assert out.factors.shape == (5, 13, 5) and out.gen_states.shape == (5, 13, 16)
    assert out.co_mean.shape == (5, 13, 2) and out.ic_mean.shape == (5, 4)
    assert set(out.losses) == {"recon", "recon_heldin", "kl_ic", "kl_co", "l2"}
    assert all(torch.isfinite(v) for v in out.losses.values())


def test_autonomous_model_and_external_inputs():
    m = small_model(co_dim=0, ext_dim=3)
    assert not hasattr(m, "con")
    out = m(counts(4, 10, 6), counts(4, 13, 8), ext=torch.randn(4, 13, 3))
    assert out.co_mean is None and out.log_rates.shape == (4, 13, 8)
    out.losses["recon"].backward()
    assert m.gen.weight_ih.grad.abs().sum() > 0  # the inputs reach the generator


def test_factor_rows_have_unit_norm():
    m = small_model(dropout=0.0).eval()
    with torch.no_grad():  # rows of norms far from 1, each its own
        m.fac.weight.mul_(torch.tensor([3.0, 0.2, 5.0, 0.5, 2.0])[:, None])
    out = m(counts(3, 10, 6), sample=False)
    # the matrix the forward pass reads the factors out with, recovered from its inputs and
    # outputs alone: factors = gen_states @ W.T over 39 bins of a 16-unit generator
    g = out.gen_states.reshape(-1, 16).double()
    w = torch.linalg.lstsq(g, out.factors.reshape(-1, 5).double()).solution.T  # (5, 16)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(5, dtype=torch.float64), rtol=1e-4,
                               atol=1e-4)  # float32 forward pass
    # each row the direction of the weight's row, scaled to unit norm
    raw = m.fac.weight.detach().double()
    torch.testing.assert_close(w, raw / raw.norm(dim=1, keepdim=True), rtol=1e-4, atol=1e-4)


def test_controller_input_lag_hides_the_current_bin():
    m = small_model(dropout=0.0, ci_lag=1).eval()
    x = counts(2, 10, 6)
    t = 4
    y = x.clone()
    y[:, t] += 3.0
    ci_x, ci_y = (m.encode(v)[2].transpose(0, 1) for v in (x, y))  # (B, T_rec, 2 H_ci)
    assert ci_x.shape == (2, 13, 16)
    torch.testing.assert_close(ci_x[:, t], ci_y[:, t])  # bin t is invisible at step t
    assert not torch.allclose(ci_x[:, t + 1], ci_y[:, t + 1])  # forward half sees it at t + 1
    assert not torch.allclose(ci_x[:, t - 1], ci_y[:, t - 1])  # backward half at t - 1
    assert torch.all(ci_x[:, 10:] == 0)  # nothing over the forward-prediction bins


def test_generator_clips_every_step_like_a_clamped_torch_gru():
    # the references' generator: g_0 = ic_to_g0(ic) unclipped, then each state of a GRU step
    # clamped to +-cell_clip; checked against torch.nn.GRUCell followed by a clamp
    m = small_model(cell_clip=0.5, dropout=0.0, co_dim=0).eval()
    with torch.no_grad():
        m.ic_to_g0.bias.fill_(10.0)  # |g_0| far above the clip
    out = m(counts(2, 10, 6), sample=False)
    ref = torch.nn.GRUCell(0, 16)
    ref.load_state_dict({k: getattr(m.gen, k) for k in ref.state_dict()})
    h = m.ic_to_g0(out.ic_mean)
    assert h.abs().max() > 5
    for t in range(SIZES["t_rec"]):
        h = ref(torch.zeros(2, 0), h).clamp(-0.5, 0.5)
        torch.testing.assert_close(out.gen_states[:, t], h)
    assert out.gen_states.abs().max() <= 0.5


def with_leaf_log_rates(m, b: int):
    """A forward pass on b trials whose log rates are a leaf tensor (gradients land there),
    and counts to reconstruct."""
    out = m(counts(b, 10, 6), sample=False)
    out.log_rates = out.log_rates.detach().requires_grad_(True)
    return out, out.log_rates, counts(b, 13, 8, seed=1)


def test_coordinated_dropout_passes_gradient_only_through_hidden_elements():
    m = small_model(dropout=0.0)
    out, log_rates, rec = with_leaf_log_rates(m, 3)
    keep = torch.rand(3, 10, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    masked = m.losses(out, rec, cd_keep=keep)
    plain = m.losses(out, rec)
    torch.testing.assert_close(masked["recon"], plain["recon"])  # same value
    (grad,) = torch.autograd.grad(masked["recon"], log_rates)
    seen = torch.zeros(3, 13, 8, dtype=torch.bool)
    seen[:, :10, :6] = keep
    assert torch.all(grad[seen] == 0)
    assert torch.all(grad[~seen] != 0)  # hidden, held-out and forward-prediction elements


def test_coordinated_dropout_hides_input_in_training_only():
    m = small_model(dropout=0.0, cd_rate=0.3)

    def hidden_share():
        enc = counts(50, 10, 6).requires_grad_(True)
        m(enc, sample=False).ic_mean.sum().backward()
        return (enc.grad == 0).float().mean().item()  # input the encoders never read

    assert 0.25 < hidden_share() < 0.35
    m.eval()
    assert hidden_share() == 0.0


def test_bits_per_spike_by_hand():
    k = np.array([[[0.0, 2.0], [1.0, 0.0]]])  # (1 trial, 2 bins, 2 neurons)
    lam = np.array([[[0.5, 1.5], [0.5, 0.5]]])
    null = np.array([[[0.5, 1.0], [0.5, 1.0]]])  # each neuron's mean count
    ll = lambda r: np.sum(k * np.log(r) - r)  # noqa: E731
    expected = (ll(lam) - ll(null)) / (k.sum() * np.log(2))
    assert bits_per_spike(lam, k) == pytest.approx(expected)
    assert bits_per_spike(null, k) == pytest.approx(0.0, abs=1e-12)


def test_bits_per_spike_rewards_the_truth():
    rng = np.random.default_rng(0)
    rates = rng.gamma(2.0, 0.5, size=(200, 10, 5))
    k = rng.poisson(rates)
    assert bits_per_spike(rates, k) > 0.1
    assert bits_per_spike(rates[::-1], k) < 0  # wrong trials: worse than the null model


def test_region_bps_leaves_out_the_regions_a_split_lacks():
    rng = np.random.default_rng(0)
    rates = rng.gamma(2.0, 0.5, size=(50, 10, 5))
    k = rng.poisson(rates)
    # every neuron held in and every bin an encoder bin: bits per spike of the whole, alone
    assert region_bps(rates, k, n_in=5, t_enc=10) == {"bps": bits_per_spike(rates, k)}
    assert set(region_bps(rates, k, n_in=3, t_enc=10)) == {"bps", "co_bps"}
    assert region_bps(rates, k, n_in=5, t_enc=8) == {
        "bps": bits_per_spike(rates[:, :8], k[:, :8]),
        "fp_bps": bits_per_spike(rates[:, 8:], k[:, 8:])}


def test_r2_mean_and_pooled():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(20, 10, 4))
    assert r2(truth, truth) == (1.0, 1.0)
    mean, pooled = r2(truth + 0.1 * rng.normal(size=truth.shape), truth)
    assert 0.95 < mean < 1 and 0.95 < pooled < 1
    shifted = truth.mean((0, 1), keepdims=True) + 0 * truth
    assert r2(shifted, truth)[0] == pytest.approx(0.0)
