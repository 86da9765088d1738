"""The wheel in IBL session files (src/ibl/prep.py) on the offline fixture (src/ibl/fixture.py,
whose session carries a wheel in the release's ALF layout): its binning against a hand
computation, a session whose wheel cannot be loaded, and choice and wheel decoded after a tiny
training run (src/decode.py)."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
from one.alf.exceptions import ALFObjectNotFound
from scipy.signal import butter, sosfiltfilt

from src import decode
from src.ibl import prep
from src.ibl.fixture import WHEEL_TURN, make_local_cache
from tests.conftest import ROOT

IBL_TINY_MODEL = ["--ic_enc_dim", "8", "--ci_enc_dim", "8", "--con_dim", "8", "--co_dim", "1",
                  "--ic_dim", "4", "--gen_dim", "16", "--fac_dim", "4", "--batch_size", "32",
                  "--n_samples", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def cache(ibl_home, tmp_path_factory):
    """The fixture cache, with HOME in a temporary folder (tests/conftest.py's ibl_home)."""
    return make_local_cache(tmp_path_factory.mktemp("one") / "cache")


def run_prep(cache, out, *args):
    return prep.main(["--local", "--cache-dir", str(cache.cache_dir), "--out-dir", str(out),
                      "--regions", "MOs", "--pids", cache.pids["main"], *args])


@pytest.fixture(scope="module")
def prepared(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    assert run_prep(cache, out) == 0
    return out / f"{cache.pids['main']}.h5"


def hand_wheel_velocity(ts, pos, starts, n_bins, bin_size, fs=1000.0):
    """The wheel's velocity per bin from its definition: position linearly interpolated on a
    1 kHz grid from the first timestamp, an 8th-order 20 Hz Butterworth low-pass run forwards
    and backwards, differences times fs (0 first), the samples of each bin averaged."""
    t = np.arange(ts[0], ts[-1], 1 / fs)
    p = np.interp(t, ts, pos)
    p = sosfiltfilt(butter(8, 20 / (fs / 2), output="sos"), p)
    v = np.r_[0.0, np.diff(p) * fs]
    out = np.empty((len(starts), n_bins))
    for k, s in enumerate(starts):
        for b in range(n_bins):
            lo, hi = s + b * bin_size, s + (b + 1) * bin_size
            out[k, b] = v[(t >= lo) & (t < hi)].mean()
    return out


def test_wheel_binning_matches_a_hand_computation(prepared, cache):
    alf = cache.session_paths["main"] / "alf"
    ts, pos = np.load(alf / "_ibl_wheel.timestamps.npy"), np.load(alf / "_ibl_wheel.position.npy")
    trials = pd.read_parquet(alf / "_ibl_trials.table.pqt")
    with h5py.File(prepared, "r") as f:
        a = dict(f.attrs)
        b = f["train_behavior"]
        assert list(b.attrs["names"]) == ["wheel_velocity"] and b.attrs["units"] == "rad/s"
        inds, got = f["train_inds"][:20], b[:20, :, 0]  # (trials, bins)
        assert f["valid_behavior"].shape == f["valid_recon_data"].shape[:2] + (1,)
        assert "alf/_ibl_wheel.position.npy" in json.loads(a["datasets"])
    starts = trials[a["align_event"]].to_numpy()[inds] - a["t_before"]
    n_bins = round((a["t_before"] + a["t_after"]) / a["bin_size"])
    hand = hand_wheel_velocity(ts, pos, starts, n_bins, a["bin_size"])
    np.testing.assert_allclose(got, hand, atol=1e-4)  # float32 in the file
    # the physics: velocity summed over a window is the wheel's net turn across it, in most
    # trials the trial's own turn of WHEEL_TURN rad against the choice's sign (ALF: choice -1
    # turns the wheel counter-clockwise, positive)
    turn = got.sum(1) * a["bin_size"]  # rad over the window
    raw = np.interp(starts + n_bins * a["bin_size"], ts, pos) - np.interp(starts, ts, pos)
    np.testing.assert_allclose(turn, raw, atol=0.02)
    choice = trials["choice"].to_numpy()[inds]
    assert np.mean(np.abs(turn + choice * WHEEL_TURN) < 0.05) >= 0.9


def test_a_wheel_that_cannot_be_loaded_costs_only_the_behaviour(cache, prepared, tmp_path,
                                                                 monkeypatch):
    def missing(one, eid, cfg):
        raise ALFObjectNotFound("wheel")

    monkeypatch.setattr(prep, "load_wheel", missing)
    assert run_prep(cache, tmp_path) == 0
    row = pd.read_csv(tmp_path / "manifest.csv").set_index("pid").loc[cache.pids["main"]]
    assert row["status"] == "ok"
    assert row["reason"].startswith("prepared; no wheel: ALFObjectNotFound")
    path = tmp_path / prepared.name
    # everything else is the file with the wheel, less its keys
    with h5py.File(path, "r") as f, h5py.File(prepared, "r") as g:
        assert set(g) - set(f) == {"train_behavior", "valid_behavior"}
        for k in f:
            if isinstance(f[k], h5py.Dataset):
                assert np.array_equal(f[k][()], g[k][()]), k
        skip = {"created", "datasets"}
        assert {k: str(v) for k, v in f.attrs.items() if k not in skip} == {
            k: str(v) for k, v in g.attrs.items() if k not in skip}
    # and a rerun keeps the reason
    assert run_prep(cache, tmp_path) == 0
    again = pd.read_csv(tmp_path / "manifest.csv").set_index("pid").loc[cache.pids["main"]]
    assert again["reason"] == row["reason"]


def test_no_wheel_flag_changes_the_settings(cache):
    assert prep.PrepConfig(wheel=False).settings_hash() != prep.PrepConfig().settings_hash()


def test_choice_and_wheel_decoded_after_training(prepared, tmp_path):
    assert decode.has_behaviour(str(prepared))
    cmd = [sys.executable, "-m", "src.main", "--data", str(prepared), "--run", "r",
           "--results-dir", str(tmp_path), "--max_steps", "20", "--eval_every", "10",
           "--no-plots", *IBL_TINY_MODEL]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    # src.main decodes after training, with the defaults, when the file has behaviour
    assert "choice balanced_accuracy: lfads" in r.stdout
    auto = json.loads((tmp_path / "r" / "summary.json").read_text())["decoding"]
    assert auto["choice"]["window"] == {"event": "firstMovement_times", "start_s": -0.1,
                                        "end_s": 0.0}
    assert (tmp_path / "r" / "decoding.csv").is_file()
    # the stimulus window: the fixture's units fire 50-250 ms after a stimulus, more for one
    # on the right; fewer penalties, widths and folds than the defaults keep the test short
    res = decode.decode_run(str(tmp_path / "r"), widths_s=(0.02, 0.08), alphas=(0.01, 1.0),
                            folds=3, event="stimOn_times", window=(0.05, 0.25))
    assert set(res) == {"behavior", "choice", "stim_side", "feedback", "psth"}
    assert res["behavior"]["names"] == ["wheel_velocity"] and res["behavior"]["units"] == "rad/s"
    assert "truth" not in res["behavior"]  # a recording: no ceiling
    for var in ("choice", "stim_side", "feedback"):
        assert res[var]["chance"] == 0.5 and res[var]["window"]["event"] == "stimOn_times"
        assert 0 <= res[var]["lfads"]["balanced_accuracy"] <= 1
    assert res["stim_side"]["smoothed"]["balanced_accuracy"] > 0.8
    assert (tmp_path / "r" / "decoding.png").is_file()
    assert (tmp_path / "r" / "decoding.csv").read_text().count(",choice,") == 2
