"""Decoding behaviour from the rates (src/decode.py) against recipes retyped from the Neural
Latents Benchmark's definitions (nlb_tools evaluation: velocity R2 and PSTH R2), a check that
the validation trials never reach the fit, files without behaviour, and a run end to end."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV

from src import decode
from src.data import DataError, load_session
from src.synth import LorenzBehaviorConfig, make_lorenz, make_lorenz_behavior, write_session
from tests.conftest import ROOT, TINY, TINY_MODEL

NLB_ALPHAS = tuple(np.logspace(-4, 0, 9))  # nlb_tools' fit_and_eval_decoder grid
TINY_BEHAVIOR = LorenzBehaviorConfig(**vars(TINY))


def nlb_velocity_r2(train_rates, train_behavior, eval_rates, eval_behavior, lag):
    """NLB's velocity R2, retyped: behaviour `lag` bins after the rates (make_tensors), trials
    and bins flattened, ridge with alpha by GridSearchCV (5 folds) on the training samples,
    scikit-learn's R2 (mean over dimensions) on the evaluation samples."""
    t = train_rates.shape[1]
    flat = lambda a: a.reshape(-1, a.shape[2])  # noqa: E731
    xs, ys = flat(train_rates[:, :t - lag]), flat(train_behavior[:, lag:])
    xe, ye = flat(eval_rates[:, :t - lag]), flat(eval_behavior[:, lag:])
    gscv = GridSearchCV(Ridge(), {"alpha": np.logspace(-4, 0, 9)}).fit(xs, ys)
    pred = gscv.predict(xe)
    return gscv.score(xe, ye), r2_score(ye, pred, multioutput="variance_weighted")


def nlb_psth_r2(psth, eval_rates, eval_cond_idx):
    """NLB's eval_psth, retyped: each condition's mean predicted rates over its evaluation
    trials against its PSTH (C, T, N), conditions stacked, R2 averaged over neurons."""
    true, pred = [], []
    for i, idx in enumerate(eval_cond_idx):
        pred.append(eval_rates[idx].mean(0))
        true.append(psth[i])
    return r2_score(np.vstack(true), np.vstack(pred))


def random_decoding_data(seed=0, trials=(60, 20), t=15, n=6, d=2):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n, d))
    out = {}
    for split, k in zip(("train", "valid"), trials):
        x = rng.gamma(2.0, 0.5, size=(k, t, n))
        y = (x + np.roll(x, 2, axis=1)) @ w  # partly 2 bins after the rates
        y[..., 0] *= 3  # dimensions of different variance and noise
        out[split] = (x, y + rng.normal(0, 1.0, size=(k, t, d)))
    return out


@pytest.mark.parametrize("lag", [0, 2])
def test_velocity_r2_is_nlbs(lag):
    data = random_decoding_data()
    (xt, yt), (xv, yv) = data["train"], data["valid"]
    cfg = decode.DecodeConfig(lag=lag, alphas=NLB_ALPHAS)
    ours = decode.decode_behaviour({"x": xt}, {"x": xv}, yt, yv, [lag], cfg)
    uniform, weighted = nlb_velocity_r2(xt, yt, xv, yv, lag)
    assert ours["r2_uniform"] == pytest.approx(uniform, abs=1e-10)
    assert ours["r2"] == pytest.approx(weighted, abs=1e-10)
    assert ours["r2"] != pytest.approx(ours["r2_uniform"], abs=1e-3)  # the two differ here


def test_psth_r2_is_nlbs():
    rng = np.random.default_rng(1)
    cond = rng.integers(0, 4, 40)
    rates = rng.gamma(2.0, 0.5, size=(40, 12, 5))
    psth = rng.gamma(2.0, 0.5, size=(4, 12, 5))
    ids = list(range(4))
    ours = decode.psth_r2(psth, decode.condition_psths(rates, cond, ids))
    assert ours == pytest.approx(nlb_psth_r2(psth, rates, [np.flatnonzero(cond == c)
                                                          for c in ids]), abs=1e-12)


def test_psth_target_is_the_smoothed_spikes_of_every_trial():
    """NLB's PSTHs average the smoothed spikes of all trials of a condition (train and eval);
    the prediction averages the validation trials' rates only."""
    rng = np.random.default_rng(2)
    counts = {s: rng.poisson(1.0, size=(k, 10, 5)).astype(float)
              for s, k in (("train", 30), ("valid", 12))}
    cond = {"train": np.arange(30) % 3, "valid": np.arange(12) % 3}
    rates = {s: rng.gamma(2.0, 0.5, size=counts[s].shape) for s in counts}
    cfg = decode.DecodeConfig(widths_s=(0.02,))
    res = decode.psth_scores({"lfads": rates}, counts, cond, 3, cfg, 0.01)
    smooth_all = decode.smooth(np.concatenate([counts["train"], counts["valid"]]), 0.05, 0.01)
    c_all = np.r_[cond["train"], cond["valid"]]
    target = np.stack([smooth_all[c_all == c][:, :, 3:].mean(0) for c in range(3)])
    pred = np.stack([rates["valid"][cond["valid"] == c][:, :, 3:].mean(0) for c in range(3)])
    assert res["lfads"]["r2"] == pytest.approx(r2_score(target.reshape(-1, 2),
                                                        pred.reshape(-1, 2)), abs=1e-12)
    assert res["n_conditions"] == 3 and np.isfinite(res["smoothed"]["r2"])


def test_scrambled_validation_targets_leave_every_fit_unchanged():
    """A decoder that reads the validation trials while fitting or choosing (lag, kernel width,
    penalty) is caught: scrambling their behaviour and labels changes no fitted weight."""
    data = random_decoding_data(seed=3)
    (xt, yt), (xv, yv) = data["train"], data["valid"]
    rng = np.random.default_rng(4)
    scrambled = rng.permutation(yv.reshape(-1, 2)).reshape(yv.shape) * 5 + 1
    widths = {f"{w:g}": {s: decode.smooth(x, w, 0.01) for s, x in (("t", xt), ("v", xv))}
              for w in (0.01, 0.03)}
    cfg = decode.DecodeConfig(lag=None)
    fits = [decode.decode_behaviour({k: v["t"] for k, v in widths.items()},
                                    {k: v["v"] for k, v in widths.items()}, yt, y, [0, 1, 2],
                                    cfg) for y in (yv, scrambled)]
    a, b = fits
    assert (a["key"], a["lag_bins"], a["alpha"]) == (b["key"], b["lag_bins"], b["alpha"])
    assert np.array_equal(a["model"].coef_, b["model"].coef_)
    assert a["r2"] != b["r2"]
    labels_t = np.where(xt[:, :, 0].mean(1) > np.median(xt[:, :, 0].mean(1)), 1.0, -1.0)
    labels_v = np.where(xv[:, :, 0].mean(1) > 1.0, 1.0, -1.0)
    feats = {s: {"x": x.mean(1)} for s, x in (("t", xt), ("v", xv))}
    runs = [decode.decode_variable(feats["t"], feats["v"], labels_t, lv, cfg)
            for lv in (labels_v, -labels_v)]
    assert np.array_equal(runs[0]["model"][-1].coef_, runs[1]["model"][-1].coef_)
    assert runs[0]["C"] == runs[1]["C"]


# -----------------------------------------------------------------------------
# files


def test_behaviour_generator_keeps_the_plain_session():
    """The behaviour option adds keys and changes nothing the plain generator writes."""
    plain, plain_attrs = make_lorenz(TINY)
    rich, rich_attrs = make_lorenz_behavior(TINY_BEHAVIOR)
    assert all(np.array_equal(plain[k], rich[k]) for k in plain)
    assert set(rich) - set(plain) == {"train_behavior", "valid_behavior", "trials/choice",
                                      "trials/firstMovement_times"}
    assert {k: v for k, v in plain_attrs.items() if k != "generator"} == {
        k: v for k, v in rich_attrs.items() if k in plain_attrs and k != "generator"}
    # the behaviour is the stated function of the latents: a linear read-out plus noise
    z = rich["latents"][rich["train_condition"]].reshape(-1, 3)
    y = rich["train_behavior"].reshape(-1, 2)
    fit = np.linalg.lstsq(np.c_[z, np.ones(len(z))], y, rcond=None)
    resid = y - np.c_[z, np.ones(len(z))] @ fit[0]
    assert resid.std() == pytest.approx(TINY_BEHAVIOR.behavior_noise, rel=0.15)


def write_fake_run(folder, data_path, noise=0.1, seed=0):
    """A run folder whose rates are the truth times log-normal noise: decoding without
    training."""
    s = load_session(str(data_path))
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    with h5py.File(os.path.join(folder, "lfads_output.h5"), "w") as f:
        for k in ("train", "valid"):
            t = getattr(s, k).truth
            f[f"{k}_rates"] = t * np.exp(noise * rng.normal(size=t.shape))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"data": str(data_path)}, f)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump({"steps": 7, "valid_co_bps": 0.5}, f)
    return str(folder)


def test_files_without_behaviour(tiny_h5, tmp_path):
    """A file with only conditions is no trigger for decoding after training, and decodes on
    demand to PSTH R2 alone; a file with nothing to decode is refused by name."""
    assert not decode.has_behaviour(str(tiny_h5))
    run = write_fake_run(tmp_path / "run", tiny_h5)
    res = decode.decode_run(run, plots=False, widths_s=(0.04,))
    assert list(res) == ["psth"] and set(res["psth"]) >= {"lfads", "smoothed", "truth"}
    bare = tmp_path / "bare.h5"
    data, attrs = make_lorenz(TINY)
    write_session(str(bare), {k: v for k, v in data.items() if "condition" not in k}, attrs)
    with pytest.raises(DataError, match=f"{bare}: nothing to decode"):
        decode.decode_run(write_fake_run(tmp_path / "bare_run", bare), plots=False)
    assert decode.main([str(tmp_path / "nowhere")]) == 2


def test_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "b.h5"
    data, attrs = make_lorenz_behavior(TINY_BEHAVIOR)
    data["valid_behavior"] = data["valid_behavior"][:, :5]
    write_session(str(path), data, attrs)
    assert decode.has_behaviour(str(path))
    with pytest.raises(DataError, match=r"b\.h5: 'valid_behavior' has shape"):
        decode.decode_run(write_fake_run(tmp_path / "run", path), plots=False)
    write_session(str(path), *make_lorenz_behavior(TINY_BEHAVIOR))
    os.remove(tmp_path / "run" / "lfads_output.h5")
    with pytest.raises(DataError, match=r"lfads_output\.h5: no such file"):
        decode.decode_run(str(tmp_path / "run"), plots=False)


@pytest.fixture(scope="module")
def behaviour_run(tmp_path_factory):
    """A tiny Lorenz session with behaviour, trained for 20 steps by src.main."""
    root = tmp_path_factory.mktemp("decode")
    path = root / "lb.h5"
    write_session(str(path), *make_lorenz_behavior(TINY_BEHAVIOR))
    cmd = [sys.executable, "-m", "src.main", "--data", str(path), "--run", "r",
           "--results-dir", str(root / "results"), "--max_steps", "20", "--eval_every", "10",
           "--no-plots", *TINY_MODEL, "--n_samples", "2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return root / "results" / "r"


def test_decode_run_end_to_end(behaviour_run, capsys):
    before = json.loads((behaviour_run / "summary.json").read_text())
    assert decode.main([str(behaviour_run), "--window", "-0.06", "0"]) == 0
    out = capsys.readouterr().out
    assert "behavior r2: lfads" in out and "smoothed" in out and "truth" in out
    summary = json.loads((behaviour_run / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k != "decoding"} == {
        k: v for k, v in before.items() if k != "decoding"}
    dec = summary["decoding"]
    assert dec["behavior"]["names"] == ["vel_0", "vel_1"]
    for target in ("behavior", "psth"):
        assert all(np.isfinite(dec[target][s]["r2"]) for s in decode.SOURCES)
    assert dec["behavior"]["truth"]["r2"] > dec["behavior"]["smoothed"]["r2"] - 0.2
    assert (behaviour_run / "decoding.png").stat().st_size > 10_000
    rows = (behaviour_run / "decoding.csv").read_text().splitlines()
    assert rows[0].startswith("session,target,source,metric,value,chance")
    assert sum(r.startswith("lb,behavior,") for r in rows) == 3
