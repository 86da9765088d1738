"""The panel of ground-truth datasets, its scores and its bench end to end."""

import csv
import importlib.util
import json
import math
import os

import h5py
import numpy as np
import pytest
import torch
from sklearn.metrics import r2_score

from src.bench import panel as bench_panel
from src.data import Split, load_session
from src.synth import ChaoticRNNConfig, LorenzConfig, make_chaotic_rnn, make_lorenz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_runner():
    """bench/lfads_torch/run.py, which needs lfads-torch only inside main()."""
    spec = importlib.util.spec_from_file_location(
        "lfads_torch_run", os.path.join(ROOT, "bench", "lfads_torch", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def panel_files(tmp_path_factory):
    """Every panel dataset written once, {name: path}: a few seconds."""
    out = tmp_path_factory.mktemp("panel")
    return {name: bench_panel.generate(name, str(out)) for name in bench_panel.PANEL}


def test_panel_files_are_sessions_of_the_stated_sizes(panel_files):
    stats = {}
    for name, path in panel_files.items():
        cfg = bench_panel.PANEL[name]
        s = load_session(path)  # refuses anything that breaks the session contract
        n_trials = cfg.n_conditions * cfg.trials_per_condition
        n_valid = round(cfg.valid_frac * n_trials)
        t_enc, n_in = cfg.n_bins - cfg.n_fp_bins, cfg.n_neurons - cfg.n_heldout
        assert (len(s.train), len(s.valid)) == (n_trials - n_valid, n_valid), name
        assert tuple(s.train.encod.shape[1:]) == (t_enc, n_in), name
        assert tuple(s.valid.recon.shape[1:]) == (cfg.n_bins, cfg.n_neurons), name
        assert s.bin_size == cfg.bin_size and s.valid.truth is not None, name
        rate = np.concatenate([s.train.truth, s.valid.truth]).mean() / s.bin_size  # Hz
        stats[name] = dict(trials=len(s.train), neurons=cfg.n_neurons, bins=cfg.n_bins,
                           ms=round(cfg.bin_size * 1e3), share=cfg.n_heldout / cfg.n_neurons,
                           rate=rate)
        # the spikes follow the truth: mean count per bin within 2% of the expected one
        counts = np.concatenate([s.train.recon.numpy(), s.valid.recon.numpy()])
        assert counts.mean() == pytest.approx(rate * s.bin_size, rel=0.02), name
    # the panel spans what users bring: neurons 20-300, bins 5-20 ms, rates 1-30 Hz, ...
    col = lambda k: [v[k] for v in stats.values()]  # noqa: E731
    assert len(stats) >= 8
    assert min(col("neurons")) <= 20 and max(col("neurons")) >= 300
    assert all(0.2 <= x <= 0.3 for x in col("share"))
    assert all(1 <= x <= 30 for x in col("rate"))
    assert min(col("rate")) < 4 and max(col("rate")) > 12
    assert set(col("ms")) >= {5, 10, 20} and all(5 <= x <= 20 for x in col("ms"))
    assert min(col("bins")) == 30 and max(col("bins")) == 100
    assert min(col("trials")) >= 150 and min(col("trials")) < 200
    assert 2500 <= max(col("trials")) <= 3000
    gens = {type(c).__name__ for c in bench_panel.PANEL.values()}
    assert gens == {"LorenzConfig", "LorenzBehaviorConfig", "ChaoticRNNConfig"}
    assert any(getattr(c, "input_magnitude", 0) > 0 for c in bench_panel.PANEL.values())
    # the insertion-like and the shallow-modulation datasets
    ibl = stats["ibl_like"]
    assert ibl["ms"] == 10 and 100 <= ibl["neurons"] <= 300 and 200 <= ibl["trials"] < 1000
    with h5py.File(panel_files["ibl_like"], "r") as f:
        per_neuron = np.concatenate([f["train_truth"][()], f["valid_truth"][()]]).mean((0, 1))
    assert per_neuron.min() < 2 and per_neuron.max() > 15  # mixed rates, about 1-20 Hz
    shallow = stats["lorenz_shallow"]
    sizes = (shallow["neurons"], shallow["bins"], shallow["ms"], shallow["trials"])
    assert sizes == (48, 60, 15, 1000)
    assert bench_panel.PANEL["lorenz_shallow"].n_heldout == 12
    assert 8 <= shallow["rate"] <= 12 and bench_panel.PANEL["lorenz_shallow"].readout_seed >= 0
    # the control is the quick start's own file
    with h5py.File(panel_files["lorenz_eg"], "r") as a, \
            h5py.File(os.path.join(ROOT, "eg_data", "lorenz.h5"), "r") as b:
        assert all(np.array_equal(a[k][()], b[k][()]) for k in b)


def test_generate_caches_and_is_deterministic(tmp_path):
    path = bench_panel.generate("lorenz_small", str(tmp_path))
    before = os.stat(path).st_mtime_ns
    assert bench_panel.generate("lorenz_small", str(tmp_path)) == path
    assert os.stat(path).st_mtime_ns == before  # the same settings: not written again
    with h5py.File(path, "r") as f:
        counts = f["train_recon_data"][()]
    os.remove(path)
    bench_panel.generate("lorenz_small", str(tmp_path))
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["train_recon_data"][()], counts)
    # a file made from other settings is replaced, not trusted
    with h5py.File(path, "a") as f:
        f.attrs["panel_config"] = "{}"
    bench_panel.generate("lorenz_small", str(tmp_path))
    with h5py.File(path, "r") as f:
        assert json.loads(f.attrs["panel_config"])["n_neurons"] == 20


def test_readout_population_and_rate_spread():
    cfg = ChaoticRNNConfig(n_conditions=20, trials_per_condition=2, n_neurons=60, n_heldout=15,
                           n_units=12, n_bins=40, n_fp_bins=0, base_rate=4.0,
                           readout_gain=0.5, rate_spread=0.6)
    data, _ = make_chaotic_rnn(cfg)
    assert data["unit_weights"].shape == (12, 12) and data["readout_mix"].shape == (12, 60)
    assert "rnn_weights" not in data  # the ideal observer's key means one neuron per unit
    truth = np.concatenate([data["train_truth"], data["valid_truth"]])  # (trials, T, N) Hz
    log_rate = np.log(truth).reshape(-1, 60)
    assert np.allclose(log_rate.std(0), 0.5, rtol=1e-4)  # readout_gain, every neuron
    # the soft bound: log rates within about readout_gain x readout_clip of their mean
    assert np.all(np.abs(log_rate - log_rate.mean(0)) < 1.5 * 0.5 * cfg.readout_clip)
    assert np.std(log_rate.mean(0)) == pytest.approx(0.6, rel=0.25)  # rate_spread
    assert np.exp(np.mean(log_rate)) == pytest.approx(4.0, rel=0.3)  # base_rate
    # Lorenz: the spread multiplies each neuron's rates; the latents and read-out stay
    plain, _ = make_lorenz(LorenzConfig(n_conditions=5, trials_per_condition=2))
    spread, _ = make_lorenz(LorenzConfig(n_conditions=5, trials_per_condition=2,
                                         rate_spread=0.6))
    def by_trial(d):  # (trials, T, N) in trial order: the split draws come after the spread's
        order = np.argsort(np.concatenate([d["train_inds"], d["valid_inds"]]))
        return np.concatenate([d["train_truth"], d["valid_truth"]])[order]

    ratio = by_trial(spread) / by_trial(plain)  # (trials, T, N)
    assert np.allclose(ratio, ratio[:1, :1], rtol=1e-5)  # one factor per neuron
    assert ratio.min() < 0.8 < 1.25 < ratio.max()


def test_ceiling_and_scores_equal_a_hand_computation():
    # 2 trials, 2 bins, 1 held-in and 1 held-out neuron; expected counts per bin
    truth = np.array([[[0.5, 1.0], [0.2, 2.0]], [[1.0, 0.5], [0.4, 1.5]]])  # (2, 2, 2)
    counts = np.array([[[1, 2], [0, 3]], [[2, 0], [1, 1]]])
    split = Split(torch.tensor(counts[:, :, :1], dtype=torch.float32),
                  torch.tensor(counts, dtype=torch.float32), None, truth, np.arange(2))

    def bps_by_hand(rates, k):  # lists of one neuron's rates and counts
        ll = lambda lam: sum(c * math.log(r) - r for c, r in zip(k, lam))  # noqa: E731
        mean = sum(k) / len(k)  # the null model: the neuron's mean count
        return (ll(rates) - ll([mean] * len(k))) / (sum(k) * math.log(2))

    held_out = [truth[0, 0, 1], truth[0, 1, 1], truth[1, 0, 1], truth[1, 1, 1]]
    held_in = [truth[0, 0, 0], truth[0, 1, 0], truth[1, 0, 0], truth[1, 1, 0]]
    top = bench_panel.ceiling(split)
    assert top["co_bps_truth"] == pytest.approx(bps_by_hand(held_out, [2, 3, 0, 1]), abs=1e-12)
    assert top["bps_truth"] == pytest.approx(bps_by_hand(held_in, [1, 0, 2, 1]), abs=1e-12)
    assert "fp_bps_truth" not in top  # no forward-prediction bins here
    # R2 of a guess: per neuron over trials x bins, then the mean and the pooled value
    guess = truth + np.array([0.1, -0.3])  # (2, 2, 2): a bias per neuron
    s = bench_panel.score(guess, split)
    sst = [sum((v - np.mean(x)) ** 2 for v in x) for x in (held_in, held_out)]
    sse = [4 * 0.1**2, 4 * 0.3**2]
    assert s["r2"] == pytest.approx(np.mean([1 - e / t for e, t in zip(sse, sst)]))
    assert s["r2_pooled"] == pytest.approx(1 - sum(sse) / sum(sst))
    assert s["r2_heldout"] == pytest.approx(1 - sse[1] / sst[1])
    assert bench_panel.score(truth, split)["co_bps"] == top["co_bps_truth"]


def test_panel_end_to_end_in_a_tiny_configuration(tmp_path, capsys):
    out = tmp_path / "panel"
    argv = ["--tiny", "--out", str(out), "--threads", "1", "--no-plots"]
    assert bench_panel.main([*argv, "--only", "lorenz_small", "ibl_like"]) == 0
    table = (out / "panel.md").read_text()
    assert table in capsys.readouterr().out
    assert "| lorenz_small | Lorenz | 10/2 | 8 (2) | 12 x 20 |" in table
    assert "ref R2" not in table  # no reference given
    with open(out / "panel.csv") as f:
        rows = {r["dataset"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["lorenz_small", "ibl_like"]  # in PANEL's order
    for name, r in rows.items():
        assert int(r["steps"]) == 6 and float(r["wall_minutes"]) > 0
        assert math.isfinite(float(r["co_bps"])) and math.isfinite(float(r["co_bps_truth"]))
        # the scores of the run's own validation rates against the truth, recomputed here:
        # scikit-learn's R2 per neuron (averaged) and one pooled over every element
        truth = load_session(str(out / "data" / f"{name}.h5")).valid.truth
        with h5py.File(out / "runs" / name / "lfads_output.h5", "r") as f:
            rates = f["valid_rates"][()]
        flat = lambda a: np.asarray(a, np.float64).reshape(-1, a.shape[-1])  # noqa: E731
        t, p = flat(truth), flat(rates)
        assert float(r["r2"]) == pytest.approx(r2_score(t, p))
        pooled = 1 - ((p - t) ** 2).sum() / ((t - t.mean(0)) ** 2).sum()
        assert float(r["r2_pooled"]) == pytest.approx(pooled)
    # lfads-torch's rates as bench/lfads_torch/run.py writes them; here the true rates, whose
    # scores are known: R2 1 and co-bps at the ceiling
    ref = tmp_path / "ref"
    ref.mkdir()
    runner = load_runner()
    data = out / "data" / "lorenz_small.h5"
    assert runner.valid_counts_sha1(str(data)) == bench_panel.valid_counts_sha1(str(data))
    truth = load_session(str(data)).valid.truth
    runner.write_rates(str(ref / "lorenz_small.h5"), truth, {
        "minutes": 0.5, "steps": 7, "valid_recon_sha1": runner.valid_counts_sha1(str(data))})
    before = (out / "runs/lorenz_small/ckpt_last.pt").stat().st_mtime_ns
    assert bench_panel.main([*argv, "--rescore", "--reference", str(ref)]) == 0
    assert (out / "runs/lorenz_small/ckpt_last.pt").stat().st_mtime_ns == before  # no training
    with open(out / "panel.csv") as f:
        rows = {r["dataset"]: r for r in csv.DictReader(f)}
    small = rows["lorenz_small"]
    assert float(small["ref_r2"]) == pytest.approx(1.0)
    assert float(small["ref_co_bps"]) == pytest.approx(float(small["co_bps_truth"]), abs=1e-6)
    assert int(small["ref_steps"]) == 7 and rows["ibl_like"]["ref_r2"] == ""
    assert "ref R2" in (out / "panel.md").read_text()
    # rates of a model trained on other data are refused
    runner.write_rates(str(ref / "ibl_like.h5"), truth, {"minutes": 0.5, "steps": 7,
                                                         "valid_recon_sha1": "0" * 40})
    with pytest.raises(SystemExit, match="other data"):
        bench_panel.main([*argv, "--rescore", "--reference", str(ref)])


def test_ctrl_c_stops_the_whole_panel(tmp_path, monkeypatch):
    calls = []

    def interrupted(argv):  # src.main's exit code after Ctrl-C
        calls.append(argv)
        return 130

    monkeypatch.setattr(bench_panel.lfads_main, "main", interrupted)
    with pytest.raises(SystemExit) as e:
        bench_panel.main(["--tiny", "--out", str(tmp_path), "--only", "lorenz_small", "crnn"])
    assert e.value.code == 130 and len(calls) == 1  # the next dataset never starts
