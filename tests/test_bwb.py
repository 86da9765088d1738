"""BrainWideBench TS2 co-smoothing (src/bwb.py) against BWB's rules retyped here from their
sources, literally and one window at a time: the held-out units (sha256 rank), the 5-minute
split chunks, torch-brain's window sampler and its bin_spikes on a lazily sliced recording;
then a session end to end: prepare, train, predict, the leaderboard's validation codes, and
ibl_bwb_eval's own writer and scorer (installed without dependencies by ./setup.sh --dev)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from src import bwb
from src.data import load_session
from tests.conftest import ROOT, TINY_MODEL

EID = "22222222-0000-4000-8000-000000000000"


def reference_held_out(ids, salt):
    """pipeline.py's rule: k = max(1, round(0.1 N)) units first by sha256 hex of salt:uuid."""
    k = max(1, round(0.1 * len(ids)))
    rank = sorted(ids, key=lambda u: hashlib.sha256(f"{salt}:{u}".encode()).hexdigest())
    return np.array([u in rank[:k] for u in ids])


def reference_sampler(start, end, step=0.02, length=1.0):
    """SequentialFixedWindowSampler._indices for one interval, as written there."""
    out = [(t.item(), (t + length).item())
           for t in torch.arange(start, end, step, dtype=torch.float64) if t + length <= end]
    if out[-1][1] < end:
        out.append((end - length, end))
    return out


def reference_bins(times, units, n_units, s, e, dom):
    """One window as BWB counts it: Data.slice (lazy) then bin_spikes (bin 20 ms, eps 1e-3,
    right=True), whose re-slice of the still unresolved spikes moves bounds and origin by
    s + new start; bins floor(t * (1 / 0.02))."""
    d0, d1 = max(dom[0], s) - s, min(dom[1], e) - s
    start, end = d0, d1
    discard = (end - start) - np.floor((end - start) / 0.02 + 1e-3) * 0.02
    if discard > 0:
        start += discard
        a, hi = start + s, min(end + s, e)
        ts = times[(times >= a) & (times < hi)] - a
        u = units[(times >= a) & (times < hi)]
    else:
        keep = (times >= s) & (times < e)
        ts, u = (times[keep] - s) - d0, units[keep]
    out = np.zeros((round((end - start) / 0.02), n_units), dtype=np.int64)
    np.add.at(out, (np.floor(ts * (1 / 0.02)).astype(int), u), 1)
    return out


def test_held_out_units_follow_the_sha256_rule():
    rng = np.random.default_rng(0)
    for n in (1, 9, 15, 25, 237):  # 15 and 25: round() halves to even (2, 2)
        ids = [f"{rng.integers(1 << 62):016x}-uuid" for _ in range(n)]
        for salt in (bwb.TEST_SALT, bwb.VAL_SALT):
            want = reference_held_out(ids, salt)
            assert np.array_equal(bwb.held_out_mask(ids, salt), want)
        assert bwb.held_out_mask(ids).sum() == max(1, round(0.1 * n))
    assert not np.array_equal(bwb.held_out_mask(ids, bwb.TEST_SALT),
                              bwb.held_out_mask(ids, bwb.VAL_SALT))


def test_split_chunks_by_hand():
    """Chunks at 0, 300, 600, 900, 1000 s; a trial across 300 stays with the first chunk
    (more of it there), one across 600 with the third; each chunk after the first starts at
    the first trial 20 s past the previous end; roles train, test, train, val."""
    trials = (np.array([10, 290, 330, 598, 640, 905, 950.0]),
              np.array([12, 303, 333, 612, 643, 907, 952.0]))
    got = bwb.chunked_splits((0.0, 1000.0), trials)
    assert got["train"][0].tolist() == [0, 640] and got["train"][1].tolist() == [303, 900]
    assert got["test"][0].tolist() == [330] and got["test"][1].tolist() == [598]
    assert got["val"][0].tolist() == [950] and got["val"][1].tolist() == [1000]
    a = ([0, 3, 7.0], [2, 5, 9.0])
    assert [x.tolist() for x in bwb.intersect(a, ([1, 8.0], [4, 10.0]))] == [[1, 3, 8], [2, 4, 9]]
    assert len(bwb.intersect(([0.0], [1.0]), ([1.0], [2.0]))[0]) == 0  # touching: nothing


@pytest.mark.parametrize("interval", [(10.0, 12.5), (10.0, 12.51), (1234.567, 1237.891)])
def test_window_starts_bit_for_bit(interval):
    want = np.array(reference_sampler(*interval))
    starts, ends = bwb.window_starts(*interval, 0.02)
    assert np.array_equal(starts.view(np.int64), want[:, 0].view(np.int64))
    assert np.array_equal(ends.view(np.int64), want[:, 1].view(np.int64))
    assert starts[0] == interval[0] and ends[-1] == interval[1]


def edge_spikes(starts, rng, dom):
    """Spikes on every bin edge of every window, a float step either side, and at random."""
    edges = (starts[:, None] + np.arange(51) * 0.02).ravel()
    t = np.concatenate([edges, np.nextafter(edges, 0), np.nextafter(edges, 1e9),
                        rng.uniform(*dom, 3000)])
    return np.sort(t[(t >= dom[0]) & (t <= dom[1])])


def test_binning_equals_bwb_per_window():
    rng = np.random.default_rng(1)
    dom = (0.5, 4000.0)
    intervals = ([3.0, 1999.987, 3000.1234], [5.731, 2003.0, 3002.9])
    starts, ends = bwb.split_windows(intervals, 0.02)
    times = edge_spikes(starts, rng, dom)
    units = rng.integers(0, 7, len(times))
    got = bwb.bin_windows(times, units, 7, starts, ends, dom)
    want = np.stack([reference_bins(times, units, 7, s, e, dom) for s, e in zip(starts, ends)])
    assert np.array_equal(got, want)
    lo = bwb.window_geometry(starts, ends, dom)[0]
    assert (lo != starts).any()  # the re-slice path is exercised...
    naive = np.stack([np.stack([np.histogram(times[units == u] - s, np.arange(51) * 0.02)[0]
                                for u in range(7)], 1) for s in starts])
    assert not np.array_equal(got, naive)  # ...and a plain histogram would count otherwise


def write_session(path, times, units, ids, trials, splits, held=None, filtering="selected_units"):
    """A session in torch-brain's Data.to_hdf5 layout, written with h5py here."""
    with h5py.File(path, "w") as f:
        for g, attrs in (("brainset", {"derived_version": "0.1.0", "unit_filtering": filtering}),
                         ("session", {"id": EID})):
            f.create_group(g).attrs.update(object="Data", absolute_start=0.0, **attrs)
        f["spikes/timestamps"], f["spikes/unit_index"] = times, units
        f["spikes/domain/start"], f["spikes/domain/end"] = [times[0]], [times[-1]]
        f["units/id"] = np.array(ids, dtype="S")
        f["units/ts2_co_smoothing_is_held_out_test"] = (
            reference_held_out(ids, "ts2_co_smoothing_test") if held is None else held)
        f["task_aligned_intervals/domain/start"] = trials[0]
        f["task_aligned_intervals/domain/end"] = trials[1]
        for split, (s, e) in splits.items():
            f[f"ts2_{split}_domain/start"], f[f"ts2_{split}_domain/end"] = s, e


def small_session(root, **kw):
    rng = np.random.default_rng(2)
    ids = [f"{i:08x}-1111-4111-8111-{rng.integers(1 << 40):012x}" for i in range(24)]
    trials = (np.array([5.0, 320.0, 700.0, 950.0]), np.array([8.0, 322.6, 703.2, 953.0]))
    splits = {"train": ([0.0, 650.0], [300.0, 900.0]), "test": ([320.0], [600.0]),
              "val": ([950.0], [1000.0])}
    times = np.sort(rng.uniform(1.0, 999.0, 20000))
    units = rng.integers(0, 24, len(times))
    path = os.path.join(root, bwb.DIRNAME, "eval", f"{EID}.h5")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_session(path, times, units, ids, trials, splits, **kw)
    return times, units, ids, trials, splits


def test_prepare_writes_the_test_windows_and_targets(tmp_path):
    times, units, ids, trials, _ = small_session(str(tmp_path))
    out = bwb.prepare(str(tmp_path), bwb.PrepareConfig(eid=EID, out_dir=str(tmp_path / "d")))
    held = reference_held_out(ids, "ts2_co_smoothing_test")
    windows = reference_sampler(320.0, 322.6)  # the only test trial
    with h5py.File(out) as f:
        assert f["bwb_test_starts"].dtype == np.float64
        assert np.array_equal(f["bwb_test_starts"][()], [w[0] for w in windows])
        want = np.stack([reference_bins(times, units, 24, s, e, (times[0], times[-1]))
                         for s, e in windows])
        assert np.array_equal(f["bwb_test_heldout"][()], want[:, :, held])
        assert np.array_equal(f["bwb_test_heldin"][()], want[:, :, ~held])
        assert [u.decode() for u in f.attrs["bwb_heldout_ids"]] == list(np.array(ids)[held])
        assert [u.decode() for u in f.attrs["unit_ids"]][-held.sum():] == list(
            np.array(ids)[held])  # held-out columns last
        assert f["train_recon_data"].shape[0] == len(reference_sampler(5.0, 8.0, 0.1)) + len(
            reference_sampler(700.0, 703.2, 0.1))
    s = load_session(out)  # our contract: python -m src.main trains it
    assert s.sizes == {"n_in": 24 - held.sum(), "n_out": 24, "t_enc": 50, "t_rec": 50,
                       "ext_dim": 0}


def run_bwb(*args):
    return subprocess.run([sys.executable, "-m", "src.bwb", *args], cwd=ROOT,
                          capture_output=True, text=True)


def test_bad_sessions_get_clear_errors(tmp_path, tiny_h5):
    r = run_bwb("prepare", str(tmp_path), "--eid", EID)
    assert r.returncode == 2 and "no file" in r.stderr and "eval" in r.stderr
    bad = tmp_path / bwb.DIRNAME / "eval" / f"{EID}.h5"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(tiny_h5.read_bytes())  # one of our session files, not BWB's
    r = run_bwb("prepare", str(tmp_path), "--eid", EID)
    assert r.returncode == 2 and "not a BrainWideBench session file" in r.stderr
    small_session(str(tmp_path), held=np.eye(24, dtype=bool)[0] | np.eye(24, dtype=bool)[1])
    assert "sha256 rule" in run_bwb("prepare", str(tmp_path), "--eid", EID).stderr
    small_session(str(tmp_path), filtering="all_units")
    assert "selected_units" in run_bwb("prepare", str(tmp_path), "--eid", EID).stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A synthetic session, prepared, a short run of seed 43 and its predictions; seeds 44 and
    45 are that run's checkpoint under their seed (what predict reads from config.json): the
    leaderboard wants three seeds, the file layout is what is tested."""
    tmp = tmp_path_factory.mktemp("bwb")
    cfg = bwb.SynthConfig(eid=EID, n_units=30, minutes=17, seed=3)
    bwb.synth(str(tmp / "root"), cfg)
    data = bwb.prepare(str(tmp / "root"), bwb.PrepareConfig(eid=EID, out_dir=str(tmp / "data"),
                                                             stride_bins=25))
    run = [sys.executable, "-m", "src.main", "--data", data, "--seed", "43", "--results-dir",
           str(tmp / "results"), "--run", "s43", "--max-steps", "20", "--eval-every", "10",
           "--no-plots", *TINY_MODEL]
    subprocess.run(run, cwd=ROOT, check=True, capture_output=True)
    printed = {}
    for seed in (43, 44, 45):
        folder = tmp / "results" / f"s{seed}"
        if seed != 43:
            shutil.copytree(tmp / "results" / "s43", folder)
            cfg = json.loads((folder / "config.json").read_text())
            cfg["train"]["seed"] = seed
            (folder / "config.json").write_text(json.dumps(cfg))
        r = run_bwb("predict", str(folder), "--label", "lfads", "--out", str(tmp / "pred"))
        assert r.returncode == 0, r.stderr
        printed[seed] = r.stdout
    return tmp, data, printed


def test_predictions_pass_the_leaderboards_checks(trained):
    tmp, data, _ = trained
    label = tmp / "pred" / "lfads"
    assert bwb.check(str(label), str(tmp / "data")) == []
    files = sorted(label.rglob("seed_*.safetensors"))
    assert [f.relative_to(label).as_posix() for f in files] == [
        f"{bwb.TASK}/{EID}/seed_{s}.safetensors" for s in (43, 44, 45)]
    from safetensors import safe_open

    with safe_open(str(files[0]), "pt") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["recording_id"] == EID and meta["seed"] == "43" and meta["task"] == bwb.TASK
    assert t["predictions"].dtype == torch.float16 and t["window_timestamps"].dtype == torch.float64
    p = bwb.read_prepared(data)
    assert t["predictions"].shape == p.targets.shape
    assert np.array_equal(t["window_timestamps"].numpy(), p.starts)


def test_checks_catch_what_the_leaderboard_refuses(trained, tmp_path):
    tmp, _, _ = trained
    label = tmp_path / "lfads"
    shutil.copytree(tmp / "pred" / "lfads", label)
    d = label / bwb.TASK / EID
    os.remove(d / "seed_45.safetensors")
    assert [c for _, c, _ in bwb.check(str(label), str(tmp / "data"))] == ["E101"]
    os.rename(d / "seed_44.safetensors", d / "seed_46.safetensors")
    (d / "seed_47.safetensors").write_bytes((d / "seed_43.safetensors").read_bytes())
    codes = [c for _, c, _ in bwb.check(str(label), str(tmp / "data"))]
    assert "E013" in codes and "E102" in codes  # headers say 44 and 43; 43, 46, 47
    (d / "notes.txt").write_text("x")
    assert "E014" in [c for _, c, _ in bwb.check(str(label), str(tmp / "data"))]


def split_safetensors(raw: bytes) -> tuple:
    """(the JSON header as a dict, the tensor bytes) of a .safetensors file."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def test_the_official_writer_and_scorer_agree(trained, tmp_path):
    """ibl_bwb_eval's PredictionsWriter and our writer give the same bytes; its scorer gives
    the score predict printed."""
    from ibl_bwb_eval.scoring import ts2 as official

    tmp, data, printed = trained
    p = bwb.read_prepared(data)
    fields = bwb.prediction_fields(p, np.log(np.full(p.targets.shape, 0.3)))
    a = bwb.write_file(str(tmp_path / "a"), "x", 43, p, fields)
    b = bwb.our_writer(str(tmp_path / "b"), "x", 43, p, fields)
    (ha, da), (hb, db) = (split_safetensors(open(x, "rb").read()) for x in (a, b))
    assert ha == hb and da == db  # the header's entries (safetensors orders them by a hash)
    r = run_bwb("score", str(tmp / "pred" / "lfads"), "--data-dir", str(tmp / "data"),
                "--gt-dir", str(tmp_path / "gt"))
    assert r.returncode == 0, r.stderr
    raw = official.score_dir(tmp / "pred" / "lfads", tmp_path / "gt")
    assert sorted(k[3] for k in raw) == [43, 44, 45]
    for (_, _, rid, seed), m in raw.items():
        assert rid == EID
        line = f"poisson_d2 {m['poisson_d2']:.4f}, bps {m['bps']:.4f}"
        assert line in printed[seed], (line, printed[seed])
        ours = bwb.score_file(str(tmp / "pred" / "lfads" / bwb.TASK / EID /
                                  f"seed_{seed}.safetensors"), p)
        assert ours["poisson_d2"] == pytest.approx(m["poisson_d2"], abs=1e-6)
        assert ours["bps"] == pytest.approx(m["bps"], abs=1e-6)


def test_scores_against_a_hand_computation():
    """Poisson D2 and bits per spike of known rates, from their definitions in float64."""
    rng = np.random.default_rng(4)
    lam = rng.gamma(2.0, 0.2, (40, 50, 3))
    y = rng.poisson(lam)
    got = bwb.score_arrays(torch.from_numpy(np.log(lam)).float(), torch.from_numpy(y))
    yy, ll = y.reshape(-1, 3).astype(float), np.log(lam).reshape(-1, 3)
    xlogy = np.where(yy > 0, yy * np.log(np.where(yy > 0, yy, 1)), 0)
    nll = np.exp(ll).sum(0) - (ll * yy).sum(0)
    sat = yy.sum(0) - xlogy.sum(0)
    null = yy.sum(0) - yy.sum(0) * np.log(yy.mean(0))  # NLL of the mean rate, up to log y!
    assert got["poisson_d2"] == pytest.approx(np.mean(1 - (nll - sat) / (null - sat)), rel=1e-5)
    bps = (null.sum() - nll.sum()) / (yy.sum() * np.log(2))
    assert got["bps"] == pytest.approx(bps, rel=1e-5)


def test_baselines_write_checked_files(trained):
    tmp, data, _ = trained
    for kind in ("mean-rate", "ridge"):
        for seed in (43, 44, 45):
            r = run_bwb("baseline", data, "--kind", kind, "--label", kind, "--out",
                        str(tmp / "base"), "--seed", str(seed))
            assert r.returncode == 0, r.stderr
        assert bwb.check(str(tmp / "base" / kind), str(tmp / "data")) == []
    p = bwb.read_prepared(data)
    mean, ridge = (bwb.score_file(str(tmp / "base" / k / bwb.TASK / EID / "seed_43.safetensors"),
                                  p) for k in ("mean-rate", "ridge"))
    assert ridge["poisson_d2"] > mean["poisson_d2"] + 0.02  # the latent drives every unit
    with open(os.path.join(str(tmp / "results" / "s43"), "config.json")) as f:
        assert json.load(f)["train"]["seed"] == 43
