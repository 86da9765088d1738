"""Bring your own recording: src/binning.py against hand computations, src/prep_nwb.py on NWB
files written here by pynwb in the layout of the Neural Latents Benchmark's (MC_Maze: units
with spike times and electrodes, trials with move_onset_time, hand velocity in a behaviour
module; and a recording without trials), src/chop.py's merge against the documented blend, and
the example of docs/your_data.md."""

import datetime
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from src.binning import bin_signal, bin_spikes
from src.chop import edge_weights, is_chopped, merge_run
from src.data import load_session
from tests.conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parent.parent
BIN, WINDOW = 0.01, (-0.25, 0.45)  # prep_nwb's defaults, as NLB MC_Maze
HELDOUT = (8, 9, 10)  # units the maze file marks held out (its `heldout` column)


# ---------------------------------------------------------------------------------------------
# binning by hand


def test_bin_spikes_by_hand():
    # unit 5 is not asked for; 0.1 lies on an edge: it opens window 1 and is bin 1 of window 0
    times = [0.05, 0.1, 0.12, 0.15, 0.21, 0.31, 0.99, 0.10]
    units = [7, 3, 3, 7, 3, 7, 3, 5]
    got = bin_spikes(times, units, [7, 3], [0.0, 0.1], 3, 0.1)  # windows [0, .3), [.1, .4)
    want = [[[1, 0], [1, 2], [0, 1]],  # 7: .05 | .15; 3: .1 .12 | .21
            [[1, 2], [0, 1], [1, 0]]]  # 7: .15 | - | .31; 3: .1 .12 | .21 | -
    np.testing.assert_array_equal(got, want)


def test_bin_signal_by_hand():
    # faster than the bins: the mean of each bin's samples, NaN ignored
    t, x = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25], [1, 3, 5, 7, np.nan, 11]
    np.testing.assert_allclose(bin_signal(t, x, [0.0], 3, 0.1)[0, :, 0], [2, 6, 11])
    # slower: a bin without a sample is interpolated at its centre (0.15, 0.25)
    np.testing.assert_allclose(bin_signal([0.0, 0.35], [0.0, 3.5], [0.0], 3, 0.1)[0, :, 0],
                               [0, 1.5, 2.5], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# NWB files like the benchmark's


def nwb_file(**kw):
    from pynwb import NWBFile

    start = datetime.datetime(2019, 6, 1, 12, tzinfo=datetime.timezone.utc)
    return NWBFile(session_description="test recording", identifier="test-id-1",
                   session_start_time=start, **kw)


def add_units(nwb, spikes: dict, locations, heldout=(), obs=None):
    """Units on one electrode each, with a `heldout` column as the benchmark's files have."""
    device = nwb.create_device("array")
    groups = {}
    for loc in dict.fromkeys(locations):
        groups[loc] = nwb.create_electrode_group(loc, description="", location=loc,
                                                 device=device)
    for loc in locations:
        nwb.add_electrode(group=groups[loc], location=loc)
    nwb.add_unit_column("heldout", "held out by the benchmark")
    for u, times in spikes.items():
        extra = {"obs_intervals": [obs]} if obs else {}
        nwb.add_unit(spike_times=times, electrodes=[u], heldout=u in heldout, **extra)


def write(nwb, path):
    from pynwb import NWBHDF5IO

    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return path


def maze_file(path) -> dict:
    """30 s, 12 units (6 on M1, 6 on PMd; unit 11 never fires), 20 trials: one without a
    movement onset (NaN) and one whose window runs past the recording's end."""
    from pynwb import TimeSeries
    from pynwb.behavior import Position, SpatialSeries

    rng = np.random.default_rng(0)
    spikes = {u: np.sort(rng.uniform(0, 30, int(rng.integers(150, 600)))) for u in range(11)}
    spikes[11] = np.array([])
    nwb = nwb_file()
    add_units(nwb, spikes, ["M1"] * 6 + ["PMd"] * 6, heldout=HELDOUT + (11,), obs=[0.0, 30.0])
    nwb.add_trial_column("move_onset_time", "movement onset, seconds")
    nwb.add_trial_column("split", "benchmark split")
    onsets = np.arange(20) * 1.45 + 0.5 + rng.uniform(0, 0.1, 20)
    onsets[3], onsets[19] = np.nan, 29.8
    for k, onset in enumerate(onsets):
        nwb.add_trial(start_time=k * 1.45, stop_time=k * 1.45 + 1.4, move_onset_time=onset,
                      split="val" if k % 4 == 0 else "train")
    t = np.arange(0, 30, 0.001)
    vel = np.c_[np.sin(t), np.cos(3 * t)]
    behaviour = nwb.create_processing_module("behavior", "hand kinematics")
    behaviour.add(TimeSeries(name="hand_vel", data=vel, unit="mm/s", timestamps=t,
                             comments="columns=[x,y]"))
    behaviour.add(Position(spatial_series=SpatialSeries(
        name="hand_pos", data=np.cumsum(vel, 0) / 1000, reference_frame="screen centre",
        rate=1000.0, starting_time=0.0, unit="mm")))
    write(nwb, path)
    return {"spikes": spikes, "onsets": onsets, "t": t, "vel": vel}


def rtt_file(path):
    """A recording without trials: 12 s of 8 units and a finger velocity at 40 Hz, slower than
    10 ms bins."""
    from pynwb import TimeSeries

    rng = np.random.default_rng(1)
    spikes = {u: np.sort(rng.uniform(0, 12, 400)) for u in range(8)}
    nwb = nwb_file()
    add_units(nwb, spikes, ["M1"] * 8, obs=[0.0, 12.0])
    t = np.arange(0, 12, 0.025)
    nwb.create_processing_module("behavior", "").add(
        TimeSeries(name="finger_vel", data=np.c_[np.sin(t), np.cos(t)], unit="mm/s",
                   timestamps=t))
    return write(nwb, path)


def prep(argv, capsys=None) -> tuple:
    from src.prep_nwb import main

    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err if capsys else ""


def test_counts_behaviour_and_provenance_match_hand_binning(tmp_path, capsys):
    pytest.importorskip("pynwb")
    truth = maze_file(tmp_path / "maze.nwb")
    rc, err = prep([tmp_path / "maze.nwb", "--out-dir", tmp_path, "--heldout-col", "heldout",
                    "--fp-bins", "5"], capsys)
    assert rc == 0, err
    assert "1 of 20 trials dropped: no move_onset_time (NaN)" in err
    assert "1 of 20 trials dropped: their window -0.25 to 0.45 s around move_onset_time runs " \
           "off the recording (0 to 30 s)" in err
    assert "1 units dropped: no spike in any window (unit ids 11)" in err
    with h5py.File(tmp_path / "maze.h5", "r") as f:
        ids = f["unit_ids"][()]
        assert ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # held-in first, 11 dropped
        assert (f.attrs["n_heldin"], f.attrs["n_heldout"]) == (8, 3)
        assert f["locations"][()].astype(str).tolist() == ["M1"] * 6 + ["PMd"] * 5
        edges = WINDOW[0] + np.arange(71) * BIN  # (T + 1,) around the event
        for split in ("train", "valid"):
            rec, inds = f[f"{split}_recon_data"][()], f[f"{split}_inds"][()]
            np.testing.assert_array_equal(f[f"{split}_encod_data"][()], rec[:, :65, :8])
            for i, row in enumerate(inds):
                for n, u in enumerate(ids):
                    hand = np.histogram(truth["spikes"][u], truth["onsets"][row] + edges)[0]
                    np.testing.assert_array_equal(rec[i, :, n], hand)
            beh = f[f"{split}_behavior"]
            assert beh.dtype == np.float32 and beh.shape == (len(inds), 70, 4)
            assert list(beh.attrs["names"]) == ["hand_pos_x", "hand_pos_y", "hand_vel_x",
                                                "hand_vel_y"]
            assert beh.attrs["units"] == "mm, mm, mm/s, mm/s"  # one string, as src.decode
            row, t = inds[0], truth["t"]
            for b in (0, 33, 69):
                lo, hi = truth["onsets"][row] + edges[b], truth["onsets"][row] + edges[b + 1]
                hand = truth["vel"][(t >= lo) & (t < hi)].mean(0)
                np.testing.assert_allclose(beh[0, b, 2:], hand, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(f["trials/move_onset_time"][()][inds],
                                          truth["onsets"][inds])
        assert sorted(np.r_[f["train_inds"][()], f["valid_inds"][()]]) == \
            [k for k in range(19) if k != 3]
        assert f.attrs["identifier"] == "test-id-1"
        assert f.attrs["session_start_time"].startswith("2019-06-01T12:00:00")
        assert f.attrs["align_event"] == "move_onset_time"
        assert tuple(f.attrs["window"]) == WINDOW and f.attrs["bin_size"] == BIN
        assert not is_chopped(str(tmp_path / "maze.h5"))
    rc, err = prep([tmp_path / "maze.nwb", "--out-dir", tmp_path / "pmd", "--region", "PMd",
                    "--trials-filter", "split=train", "--heldout-frac", "0.4"], capsys)
    assert rc == 0, err
    with h5py.File(tmp_path / "pmd" / "maze.h5", "r") as f:
        assert sorted(f["unit_ids"][()]) == [6, 7, 8, 9, 10]
        assert (f.attrs["n_heldin"], f.attrs["n_heldout"]) == (3, 2)
        kept = np.r_[f["train_inds"][()], f["valid_inds"][()]]
        assert not any(k % 4 == 0 for k in kept)  # the val rows filtered out


def test_errors_name_the_file_and_what_exists(tmp_path, capsys):
    pytest.importorskip("pynwb")
    out = tmp_path / "out"
    (tmp_path / "notes.nwb").write_text("not HDF5")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = 1
    write(nwb_file(), tmp_path / "empty.nwb")
    maze_file(tmp_path / "maze.nwb")
    rtt_file(tmp_path / "rtt.nwb")
    cases = [
        ([tmp_path / "notes.nwb"], "notes.nwb: not an NWB file"),
        ([tmp_path / "plain.h5"], "plain.h5: not an NWB file (an HDF5 file without the"),
        ([tmp_path / "empty.nwb"], "empty.nwb: no units table"),
        ([tmp_path / "maze.nwb", "--align", "go_time"], "the trial table has no column "
         "'go_time' (it has: start_time, stop_time, move_onset_time, split)"),
        ([tmp_path / "maze.nwb", "--align", "split"], "--align split: the column holds"),
        ([tmp_path / "maze.nwb", "--trials-filter", "move_onset_time=late"], "--trials-filter "
         "move_onset_time=late: column 'move_onset_time' holds numbers"),
        ([tmp_path / "maze.nwb", "--units-filter", "quality=good"], "the unit table has no "
         "column 'quality' (it has: heldout, spike_times, obs_intervals, electrodes)"),
        ([tmp_path / "maze.nwb", "--region", "V1"], "no unit in --region V1 (locations "
         "present: M1, PMd)"),
        ([tmp_path / "maze.nwb", "--behavior", "eye_pos"], "--behavior eye_pos: not in "
         "processing['behavior'] (it has: hand_pos, hand_vel)"),
        ([tmp_path / "rtt.nwb"], "rtt.nwb: no trials table, so nothing to align to; cut the "
         "recording into segments instead with --chop LEN --overlap OV"),
        ([tmp_path / "rtt.nwb", "--chop", "1", "--overlap", "0.6"], "--overlap 0.6: must be "
         "at least 0 and at most half of --chop 1"),
        ([tmp_path / "rtt.nwb", "--chop", "1.005"], "--chop 1.005: not a whole number of"),
    ]
    for argv, message in cases:
        rc, err = prep([*argv, "--out-dir", out], capsys)
        assert rc == 2 and message in " ".join(err.split()), (argv, err)
    assert not out.exists() or not any(out.iterdir())  # nothing written, not even a temporary


def test_chop_then_merge_gives_the_rates_back_and_blends_the_overlaps(tmp_path):
    seg, ov, step, n_seg = 10, 3, 7, 6  # 6 segments of 10 bins every 7: 45 bins
    rng = np.random.default_rng(2)
    rates = rng.uniform(0.1, 2, (45, 2)).astype(np.float32)  # (S, N) what the model would say
    # each segment is off by its number, so the blend in an overlap shows
    segs = np.stack([rates[k * step:k * step + seg] + k for k in range(n_seg)])  # (K, T, N)
    inds = {"train": np.array([3, 0, 5, 2]), "valid": np.array([4, 1])}
    session = tmp_path / "rec.h5"
    with h5py.File(session, "w") as f:
        f.attrs.update(bin_size=0.02, chop_bins=seg, chop_overlap_bins=ov)
        f["segment_starts"] = 5.0 + np.arange(n_seg) * step * 0.02
        for split, k in inds.items():
            f[f"{split}_inds"] = k
    with h5py.File(tmp_path / "lfads_output.h5", "w") as f:
        for split, k in inds.items():
            f[f"{split}_rates"] = segs[k]
    (tmp_path / "config.json").write_text(json.dumps({"data": str(session)}))
    assert is_chopped(str(session))
    assert merge_run(str(tmp_path)) == [str(tmp_path / "lfads_output.h5")]
    with h5py.File(tmp_path / "lfads_output.h5", "r") as f:
        merged, times, valid = f["merged_rates"][()], f["merged_times"][()], f["merged_valid"][()]
        assert f["train_rates"].shape == (4, seg, 2)  # the segments stay
    assert merged.shape == (45, 2)
    x2 = edge_weights(ov)[:, None]  # the later segment's weight, x^2 at x = (k + 0.5) / OV
    np.testing.assert_allclose(x2[:, 0], ((np.arange(3) + 0.5) / 3) ** 2)
    for k in range(n_seg):
        lo = k * step + (ov if k else 0)
        hi = k * step + seg - (ov if k < n_seg - 1 else 0)
        np.testing.assert_array_equal(merged[lo:hi], rates[lo:hi] + k)  # exactly, one segment
        if k < n_seg - 1:
            at = slice((k + 1) * step, (k + 1) * step + ov)
            blend = (1 - x2) * (rates[at] + k) + x2 * (rates[at] + k + 1)
            np.testing.assert_allclose(merged[at], blend, rtol=1e-6)
    np.testing.assert_allclose(times, 5.0 + np.arange(45) * 0.02)
    # validation segments 1 (bins 7-16) and 4 (28-37), less what segments 0, 2, 3, 5 hold
    assert np.flatnonzero(valid).tolist() == [10, 11, 12, 13, 31, 32, 33, 34]


def test_prepared_files_train_and_the_chopped_run_merges(tmp_path, capsys):
    pytest.importorskip("pynwb")
    from src.main import main

    maze_file(tmp_path / "maze.nwb")
    rtt_file(tmp_path / "rtt.nwb")
    data = tmp_path / "data"
    assert prep([tmp_path / "maze.nwb", "--out-dir", data, "--fp-bins", "5"])[0] == 0
    rc, err = prep([tmp_path / "rtt.nwb", "--out-dir", data, "--chop", "1", "--overlap", "0.2"],
                   capsys)
    assert rc == 0, err
    assert "behaviour finger_vel: sampled at 40 Hz, not the bins' 100 Hz; resampled" in err
    assert "the last 0.600 s of the recording are shorter than a segment" in err
    common = ["--max_steps", "20", "--eval_every", "10", "--n_samples", "2", "--no-plots",
              "--results-dir", str(tmp_path / "results"), *TINY_MODEL]
    for name in ("maze", "rtt"):
        assert main(["--data", str(data / f"{name}.h5"), "--run", name, *common]) == 0
    with h5py.File(tmp_path / "results" / "maze" / "lfads_output.h5", "r") as f:
        n_train = len(load_session(str(data / "maze.h5")).train)
        assert f["train_rates"].shape == (n_train, 70, 11)
    run = tmp_path / "results" / "rtt"
    assert is_chopped(str(data / "rtt.h5"))
    assert merge_run(str(run)) == [str(run / "lfads_output.h5")]  # again if src.main did
    with h5py.File(run / "lfads_output.h5", "r") as f:
        merged = f["merged_rates"][()]
        assert merged.shape == (13 * 80 + 100, 8)  # 14 segments of 100 bins every 80
        assert np.isfinite(merged).all() and (merged > 0).all()
        assert f["merged_factors"].shape[0] == merged.shape[0]
        np.testing.assert_allclose(f["merged_times"][[0, -1]], [0.0, 11.39])


def test_the_docs_example_fills_a_session_file_that_loads(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "your_data.md").read_text()
    section = text.split("## From spike times")[1].split("\n## ")[0]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    exec(compile(code, "docs/your_data.md", "exec"), {})
    s = load_session(str(tmp_path / "data" / "my_session.h5"))
    assert s.sizes == {"n_in": 24, "n_out": 30, "t_enc": 100, "t_rec": 100, "ext_dim": 0}
    assert len(s.train) + len(s.valid) == 197 and s.train.recon.sum() > 0


def test_a_trial_across_a_gap_in_the_observed_intervals_is_dropped_and_counted(tmp_path, capsys):
    """The units are observed over 0-10 s and 12-30 s: a trial whose window reaches into the
    gap is dropped and counted, never binned as if the gap held no spikes."""
    pytest.importorskip("pynwb")
    rng = np.random.default_rng(4)
    nwb = nwb_file()
    spikes = {u: np.sort(np.r_[rng.uniform(0, 10, 80), rng.uniform(12, 30, 150)])
              for u in range(4)}
    device = nwb.create_device("array")
    group = nwb.create_electrode_group("M1", description="", location="M1", device=device)
    for u, times in spikes.items():
        nwb.add_electrode(group=group, location="M1")
        nwb.add_unit(spike_times=times, electrodes=[u], obs_intervals=[[0.0, 10.0], [12.0, 30.0]])
    nwb.add_trial_column("move_onset_time", "movement onset, seconds")
    onsets = np.array([2.0, 5.0, 9.7, 10.2, 11.9, 12.2, 20.0, 25.0])  # 9.7 to 12.2: the gap
    for onset in onsets:
        nwb.add_trial(start_time=onset - 0.5, stop_time=onset + 0.5, move_onset_time=onset)
    write(nwb, tmp_path / "gap.nwb")
    rc, err = prep([tmp_path / "gap.nwb", "--out-dir", tmp_path, "--heldout-frac", "0.25"],
                   capsys)
    assert rc == 0, err
    assert "4 of 8 trials dropped: their window -0.25 to 0.45 s around move_onset_time leaves " \
           "the units' observed intervals" in " ".join(err.split())
    with h5py.File(tmp_path / "gap.h5", "r") as f:
        kept = sorted(np.r_[f["train_inds"][()], f["valid_inds"][()]])
    assert kept == [0, 1, 6, 7]  # windows inside 0-10 s or 12-30 s only
