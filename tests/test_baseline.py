"""NLB's smoothing baseline (src/baseline.py) against its recipe retyped: the kernel from its
equation, numpy's 'same' convolution, a Poisson GLM whose penalised likelihood is maximised
here by scipy, and the baseline beside every run's scores."""

import json

import numpy as np
import pytest

from tests.conftest import TINY_MODEL


def test_kernel_is_nlbs_gaussian():
    from src.baseline import kernel

    for sd, bin_size, m, s in ((0.05, 0.005, 60, 10), (0.05, 0.02, 15, 2), (0.03, 0.005, 36, 6)):
        n = np.arange(m) - (m - 1) / 2  # int(6 SD / bin) points, SD int(SD / bin) bins
        want = np.exp(-0.5 * (n / s) ** 2)
        np.testing.assert_allclose(kernel(sd, bin_size), want / want.sum(), rtol=1e-12)


def test_smoothing_is_numpys_same_convolution_per_trial_and_neuron():
    from src.baseline import kernel, smooth

    x = np.random.default_rng(0).poisson(0.4, (5, 70, 3))
    w = kernel(0.05, 0.005)
    want = np.apply_along_axis(lambda v: np.convolve(v, w, "same"), 1, x)
    np.testing.assert_allclose(smooth(x, w), want, atol=1e-12)


def poisson_glm(x, y, alpha):
    """scikit-learn's PoissonRegressor objective, minimised by scipy: mean half deviance plus
    alpha / 2 times the squared weights (the intercept unpenalised)."""
    from scipy.optimize import minimize

    def loss(p):
        eta = x @ p[1:] + p[0]
        mu = np.exp(eta)
        obj = np.mean(mu - y * eta) + alpha / 2 * p[1:] @ p[1:]
        grad = np.r_[np.mean(mu - y), x.T @ (mu - y) / len(y) + alpha * p[1:]]
        return obj, grad

    p = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B",
                 options={"gtol": 1e-10, "maxiter": 5000}).x
    return lambda xe: np.exp(xe @ p[1:] + p[0])


def test_glm_rates_match_a_penalised_poisson_fit():
    from src.baseline import kernel, smooth, smoothing_rates

    rng = np.random.default_rng(1)
    latent = np.sin(np.linspace(0, 6, 50))[None, :, None] + rng.normal(0, 0.3, (40, 1, 1))
    rates = np.exp(-1.5 + latent * np.array([0.5, -0.4, 0.8, 0.3, 0.6]))  # (K, T, 5)
    counts = rng.poisson(rates)
    tr_in, tr_out, ev_in = counts[:30, :, :3], counts[:30, :, 3:], counts[30:, :, :3]
    [(hin, hout)] = smoothing_rates(tr_in, tr_out, [ev_in], 0.01, 0.05, 0.01)
    w = kernel(0.05, 0.01)
    np.testing.assert_allclose(hin, smooth(ev_in, w))  # held-in rates: the smoothed spikes
    x = np.log(smooth(tr_in, w).reshape(-1, 3) + 1e-4)
    xe = np.log(smooth(ev_in, w).reshape(-1, 3) + 1e-4)
    for j in range(2):
        want = poisson_glm(x, tr_out[..., j].ravel(), 0.01)(xe)
        np.testing.assert_allclose(hout[..., j].ravel(), want, rtol=2e-3)


def test_every_run_reports_the_baseline_on_its_own_trials(tiny_h5, tmp_path, capsys):
    from src.baseline import smoothing_rates
    from src.data import load_session
    from src.main import main
    from src.metrics import bits_per_spike

    assert main(["--data", str(tiny_h5), "--max_steps", "4", "--eval_every", "2", "--no-plots",
                 "--results-dir", str(tmp_path / "runs"), "--run", "r", *TINY_MODEL]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    s = load_session(str(tiny_h5))
    t, n = s.train.encod.shape[1:]
    tr, va = s.train.recon.numpy()[:, :t], s.valid.recon.numpy()[:, :t]
    [(_, rates)] = smoothing_rates(tr[..., :n], tr[..., n:], [va[..., :n]], s.bin_size)
    want = bits_per_spike(rates, va[..., n:])
    assert summary["valid_co_bps_smoothing"] == pytest.approx(want)
    assert f"valid_co_bps_smoothing {want:.3f}" in out.split("done:")[1]
    assert "valid_fp_bps_smoothing" not in summary  # the baseline predicts no forward bins


def test_no_heldout_neurons_no_baseline(tiny_h5):
    import dataclasses

    from src.baseline import session_scores
    from src.data import load_session

    s = load_session(str(tiny_h5))
    n = s.train.encod.shape[2]
    cut = {k: dataclasses.replace(getattr(s, k), recon=getattr(s, k).recon[..., :n])
           for k in ("train", "valid")}
    assert session_scores(dataclasses.replace(s, **cut)) == {}
