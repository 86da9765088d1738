"""The chaotic-RNN generator, sample validation and the quality benchmark end to end."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import r2_score

from src.bench import quality as bench_quality
from src.data import load_session
from src.main import main as train_main
from src.metrics import posterior_average
from src.model import LFADS, LFADSConfig
from src.synth import ChaoticRNNConfig, chaotic_rnn_rates, chaotic_rnn_weights, make_chaotic_rnn
from tests.test_train import read_metrics

SMALL = dict(n_conditions=4, trials_per_condition=3, n_neurons=12, n_heldout=3, n_bins=40,
             n_fp_bins=5)


def test_chaotic_rnn_is_deterministic_and_follows_the_contract():
    cfg = ChaoticRNNConfig(**SMALL, input_magnitude=20.0)
    a, attrs = make_chaotic_rnn(cfg)
    b, _ = make_chaotic_rnn(cfg)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    c, _ = make_chaotic_rnn(ChaoticRNNConfig(**SMALL, input_magnitude=20.0, seed=6))
    assert not np.array_equal(a["train_truth"], c["train_truth"])
    n_tr, n_va = len(a["train_inds"]), len(a["valid_inds"])
    assert n_tr + n_va == 12 and n_va == round(0.2 * 12)
    assert a["train_encod_data"].shape == (n_tr, 35, 9)
    assert a["train_recon_data"].shape == a["train_truth"].shape == (n_tr, 40, 12)
    # rates = max_rate (tanh + 1) / 2: inside (0, 30 Hz), spread over most of that range
    truth = np.concatenate([a["train_truth"], a["valid_truth"]])
    assert 0 <= truth.min() < 5 and 25 < truth.max() <= 30
    assert attrs["conversion_factor"] == 100.0
    # one pulse per trial, in the middle half of the trial
    t = np.concatenate([a["train_pulse_time"], a["valid_pulse_time"]])
    assert t.shape == (12,) and t.min() >= 10 and t.max() < 30
    assert "train_pulse_time" not in make_chaotic_rnn(ChaoticRNNConfig(**SMALL))[0]


def test_the_pulse_changes_the_rates_from_its_time_on_only():
    cfg = ChaoticRNNConfig(**SMALL, input_magnitude=20.0)
    x0 = np.random.default_rng(0).normal(size=(5, 12))
    pulse = np.array([10, 15, 20, 25, 29])
    w, b_in = chaotic_rnn_weights(cfg, np.random.default_rng(1))
    free = chaotic_rnn_rates(cfg, w, b_in, x0)  # (5, 40, 12)
    kicked = chaotic_rnn_rates(cfg, w, b_in, x0, pulse)
    for tr, p in enumerate(pulse):
        # before the pulse the runs are the same up to each unit's normalisation (affine)
        before = [np.corrcoef(free[tr, :p, n], kicked[tr, :p, n])[0, 1] for n in range(12)]
        assert np.allclose(before, 1.0, atol=1e-6)
        change = np.abs(kicked[tr, p] - free[tr, p]).mean() - np.abs(
            kicked[tr, p - 1] - free[tr, p - 1]).mean()
        assert change > 3.0  # Hz: a jump at the pulse


def test_pulse_scores():
    t = np.array([12, 20, 31, 40])
    co = np.random.default_rng(0).normal(scale=0.1, size=(4, 60, 2))
    co[np.arange(4), t + np.array([0, 1, -2, 0])] = 5.0  # found, within the tolerance
    s = bench_quality.pulse_scores(co, t)
    assert s["pulse_hits"] == 1.0 and s["pulse_err_median"] <= 1 and s["pulse_corr"] > 0.3
    assert s["pulse_offset_median"] == 0
    co[3, 50] = 10.0  # one trial's largest input far from its pulse
    assert bench_quality.pulse_scores(co, t)["pulse_hits"] == 0.75
    co[np.arange(4), t - 4] = 20.0  # every peak 4 bins early: found within 5 bins only
    s = bench_quality.pulse_scores(co, t)
    assert s["pulse_hits"] == 0 and s["pulse_hits_5"] == 1 and s["pulse_offset_median"] == -4


def test_sample_validation_elements_never_train():
    torch.manual_seed(0)
    cfg = LFADSConfig(n_in=6, n_out=8, t_enc=10, t_rec=12, ic_enc_dim=8, ci_enc_dim=8,
                      con_dim=8, co_dim=2, ic_dim=4, gen_dim=16, fac_dim=4, sv_rate=0.3)
    model = LFADS(cfg)
    enc = torch.poisson(torch.full((5, 10, 6), 2.0))
    rec = torch.cat([torch.cat([enc, torch.poisson(torch.full((5, 10, 2), 2.0))], 2),
                     torch.poisson(torch.full((5, 2, 8), 2.0))], 1)  # (5, 12, 8)
    sv = torch.rand(enc.shape) < 0.3

    def loss_and_grads(enc, rec):
        torch.manual_seed(1)  # the same dropout, coordinated dropout and posterior samples
        out = model(enc, rec, sv_mask=sv)
        model.zero_grad()
        model.total_loss(out.losses, 1.0, 1.0).backward()
        return out.losses, [p.grad.clone() for p in model.parameters()]

    model.train()
    terms, grads = loss_and_grads(enc, rec)
    # change the held-out elements, both what the encoders read and what is reconstructed
    enc2, rec2 = enc.clone(), rec.clone()
    enc2[sv] += 7
    rec2[:, :10, :6][sv] += 5
    terms2, grads2 = loss_and_grads(enc2, rec2)
    assert torch.equal(terms["recon"], terms2["recon"])
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))
    assert terms2["recon_sv"] > terms["recon_sv"] > 0  # ... but their cost sees the change
    assert not terms["recon_sv"].requires_grad


def test_sample_validation_cost_is_logged(tiny_h5, tmp_path):
    from tests.conftest import TINY_MODEL

    argv = ["--data", str(tiny_h5), "--results-dir", str(tmp_path / "r"), "--run", "sv",
            "--max_steps", "4", "--eval_every", "2", "--sv_rate", "0.2", "--no-plots",
            *TINY_MODEL]
    assert train_main(argv) == 0
    rows = read_metrics(tmp_path / "r" / "sv")
    assert len(rows) == 2
    for r in rows:
        assert 0 < float(r["train_recon_sv"]) < float(r["train_recon"])
        assert 0 < float(r["valid_recon_sv"]) < float(r["valid_recon"])


def test_quality_bench_end_to_end_in_a_tiny_configuration(tmp_path, capsys):
    out, media = tmp_path / "bench", tmp_path / "media"
    argv = ["--tiny", "--out", str(out), "--media", str(media), "--samples", "3"]
    assert bench_quality.main([*argv, "--only", "lorenz", "chaotic_rnn_pulses"]) == 0
    printed = capsys.readouterr().out
    table = (out / "quality.md").read_text()
    assert table in printed and "| lorenz | 24/6 | 10 (3) |" in table
    with open(out / "quality.csv") as f:
        rows = {r["dataset"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"lorenz", "chaotic_rnn_pulses"}
    for name, r in rows.items():
        assert math.isfinite(float(r["r2"])) and float(r["co_bps_truth"]) > 0
        assert int(r["steps"]) == 6 and int(r["samples"]) == 3
        # the R2 of the posterior-mean rates of the run's best model against the truth,
        # recomputed here with scikit-learn's formula
        valid = load_session(str(out / "data" / f"{name}.h5")).valid
        model = bench_quality.load_model(str(out / "runs" / name))
        rates = posterior_average(model, valid.encod, valid.ext, 0)["rates"]
        flat = lambda a: np.asarray(a, np.float64).reshape(-1, a.shape[-1])  # noqa: E731
        assert float(r["r2_means"]) == pytest.approx(r2_score(flat(valid.truth), flat(rates)))
    assert 0 <= float(rows["chaotic_rnn_pulses"]["pulse_hits"]) <= 1
    assert rows["lorenz"]["pulse_hits"] == ""  # no pulses in the Lorenz data
    assert (media / "quality_lorenz.png").is_file()
    assert (media / "quality_chaotic_rnn_pulses.png").is_file()
    # one more dataset later: the table keeps the earlier rows
    assert bench_quality.main([*argv, "--only", "chaotic_rnn", "--media", ""]) == 0
    saved = json.loads((out / "rows.json").read_text())
    assert list(saved) == ["lorenz", "chaotic_rnn_pulses", "chaotic_rnn"]
    lines = (out / "quality.md").read_text().splitlines()
    assert [ln.split(" | ")[0] for ln in lines[2:]] == ["| lorenz", "| chaotic_rnn",
                                                        "| chaotic_rnn_pulses"]
    # --rescore scores the trained run again, without training it
    before = (out / "runs/chaotic_rnn_pulses/ckpt_last.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert bench_quality.main([*argv, "--only", "chaotic_rnn_pulses", "--rescore"]) == 0
    again = capsys.readouterr().out
    assert "scoring" in again and "python -m src.main" not in again
    assert (out / "runs/chaotic_rnn_pulses/ckpt_last.pt").stat().st_mtime_ns == before
    rescored = json.loads((out / "rows.json").read_text())["chaotic_rnn_pulses"]
    assert rescored["steps"] == saved["chaotic_rnn_pulses"]["steps"] and "pulse_hits_5" in rescored


def test_ideal_observer_recovers_the_rates_and_is_limited_by_the_spikes(tmp_path):
    """Given the true RNN, the MAP initial states give rates close to the truth when spikes are
    plentiful, and worse ones from fewer spikes; data with pulses are declined."""
    def ideal(max_rate):
        cfg = ChaoticRNNConfig(n_conditions=20, trials_per_condition=5, n_neurons=20,
                               n_heldout=5, n_bins=40, n_fp_bins=5, max_rate=max_rate)
        path = tmp_path / f"crnn_{max_rate}.h5"
        bench_quality.write_session(str(path), *make_chaotic_rnn(cfg))
        return bench_quality.ideal_observer(str(path))

    many, few = ideal(300.0), ideal(10.0)  # about 1.5 and 0.05 spikes per bin
    assert many["r2_ideal"] > 0.9 and many["r2_heldout_ideal"] > 0.8
    assert few["r2_ideal"] < many["r2_ideal"] - 0.1
    pulses = tmp_path / "pulses.h5"
    bench_quality.write_session(str(pulses), *make_chaotic_rnn(
        ChaoticRNNConfig(**SMALL, input_magnitude=20.0)))
    assert bench_quality.ideal_observer(str(pulses)) is None
