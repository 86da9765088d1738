"""The Neural Latents Benchmark end to end: src/nlb.py on NWB files written here by pynwb in the
layouts of NLB's MC_Maze (a train file and a test file: held-out units, obs_intervals, split,
move_onset_time, trial_type/trial_version, hand velocity at 1 kHz) and Area2_Bump (a boolean
condition, a negative behaviour lag, one decoder per trial kind) and MC_RTT (back-to-back
segments aligned to start_time, overlap allowed, finger velocity). The tensors are checked bin
for bin against nlb_tools' definitions retyped here (whole 1 ms samples by truncation, 5 ms
bins of the file's clock from the first at or after the event + offset, units by id), the
submission's keys, shapes and dtypes against those NLB's evaluation reads, and its scores
against NLB's formulas retyped."""

import datetime
import json

import h5py
import numpy as np
import pytest

from tests.conftest import TINY_MODEL

MAZE_UNITS = [7, 3, 12, 5, 9, 1, 20, 14, 2, 11]  # ids out of order: NLB sorts them
MAZE_HELDOUT = {12, 1, 2}


def nwb_file(name: str):
    from pynwb import NWBFile

    start = datetime.datetime(2021, 6, 1, 12, tzinfo=datetime.timezone.utc)
    return NWBFile(session_description="NLB-shaped test file", identifier=name,
                   session_start_time=start)


def write(nwb, path):
    from pynwb import NWBHDF5IO

    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return path


def rates_hz(t_rel: np.ndarray, unit: int, cond: int) -> np.ndarray:
    """A firing rate that depends on the time from the event and on the condition."""
    return 8 + 6 * unit % 5 + 20 * np.exp(-((t_rel - 0.05 * (cond % 4)) / 0.15) ** 2) * (
        1 + (unit + cond) % 3)


def spikes_of(rng, unit: int, events, conds, end: float) -> np.ndarray:
    """Poisson spikes over [0, end): a baseline plus a bump around each trial's event."""
    t = np.arange(0, end, 0.001)
    r = np.full(t.shape, 8.0 + unit % 4)
    for e, c in zip(events, conds):
        if np.isfinite(e):
            near = np.abs(t - e) < 0.6
            r[near] = rates_hz(t[near] - e, unit, c)
    n = rng.poisson(r * 0.001)
    times = np.repeat(t, n) + rng.uniform(0, 0.001, n.sum())
    return np.sort(times[times < end])


def add_units(nwb, spikes: dict, heldout: set, obs):
    nwb.add_unit_column("heldout", "held out by the benchmark")
    for uid, times in spikes.items():
        nwb.add_unit(id=uid, spike_times=times, obs_intervals=obs, heldout=uid in heldout)


def add_trials(nwb, columns: dict):
    for name in columns:
        if name not in ("start_time", "stop_time"):
            nwb.add_trial_column(name, f"the benchmark's {name}")
    for k in range(len(columns["start_time"])):
        nwb.add_trial(**{name: v[k] for name, v in columns.items()})


def add_velocity(nwb, name: str, end: float, rng):
    """A smooth velocity at 1 kHz (NLB's files: timestamps in seconds, columns in comments)."""
    from pynwb import TimeSeries

    t = np.arange(int(round(end * 1000))) / 1000
    v = np.c_[np.sin(2.1 * t) + 0.3 * np.sin(17 * t), np.cos(1.3 * t) + 0.2 * rng.normal(
        size=t.size).cumsum() / 300]
    nwb.create_processing_module("behavior", "kinematics").add(TimeSeries(
        name=name, data=v, unit="mm/s", timestamps=t, comments="columns=[x,y]"))


def maze_files(folder, seed: int = 0, n_trials: int = 48) -> dict:
    """sub-X_ses-full_desc-train and _desc-test files in MC_Maze's layout; returns the truth."""
    rng = np.random.default_rng(seed)
    start = 0.3 + 1.5 * np.arange(n_trials)
    onset = start + 0.4 + np.round(rng.uniform(0, 0.3, n_trials), 6)
    split = np.array(["train", "train", "val", "train", "none", "train"] * n_trials)[:n_trials]
    onset[split == "none"] = np.nan  # NLB's unused trials may lack the event
    ttype, tver = rng.integers(0, 3, n_trials), rng.integers(0, 2, n_trials)
    end = start[-1] + 3.0
    nwb = nwb_file("maze-train")
    spikes = {u: spikes_of(rng, i, onset, ttype * 2 + tver, end)
              for i, u in enumerate(MAZE_UNITS)}
    add_units(nwb, spikes, MAZE_HELDOUT, [[0.0, end]])
    add_trials(nwb, {"start_time": start, "stop_time": start + 1.3, "move_onset_time": onset,
                     "split": split, "trial_type": ttype, "trial_version": tver})
    add_velocity(nwb, "hand_vel", end, rng)
    folder.mkdir(parents=True, exist_ok=True)
    write(nwb, folder / "sub-X_ses-full_desc-train_behavior+ecephys.nwb")
    # the test file: held-in units only, each trial its own observed interval
    t_start = 0.5 + 2.0 * np.arange(12)
    t_onset = t_start + 0.3 + np.round(rng.uniform(0, 0.2, 12), 6)
    t_stop = t_onset + 0.5  # the forward bins (0.45 to 0.65 s) run into the gap
    test = nwb_file("maze-test")
    hin = [u for u in MAZE_UNITS if u not in MAZE_HELDOUT]
    t_spikes = {u: spikes_of(rng, i, t_onset, np.zeros(12, int), t_stop[-1] + 1)
                for i, u in enumerate(hin)}
    t_spikes = {u: s[np.any((s[:, None] >= t_start) & (s[:, None] < t_stop), 1)]
                for u, s in t_spikes.items()}
    add_units(test, t_spikes, set(), np.c_[t_start, t_stop])
    add_trials(test, {"start_time": t_start, "stop_time": t_stop, "move_onset_time": t_onset,
                      "split": np.array(["test"] * 12)})
    write(test, folder / "sub-X_ses-full_desc-test_ecephys.nwb")
    return {"spikes": spikes, "onset": onset, "split": split, "test_spikes": t_spikes,
            "test_onset": t_onset, "ttype": ttype, "tver": tver, "end": end}


def area2_files(folder, seed: int = 1, n_trials: int = 40) -> dict:
    """Area2_Bump's layout: cond_dir, a boolean ctr_hold_bump, windows -100 to 500 ms."""
    rng = np.random.default_rng(seed)
    start = 0.2 + 1.2 * np.arange(n_trials)
    onset = start + 0.3 + np.round(rng.uniform(0, 0.2, n_trials), 6)
    split = np.array(["train", "val", "train", "train"] * n_trials)[:n_trials]
    cond_dir = rng.choice([0.0, 90.0, 180.0, 270.0], n_trials)
    bump = rng.uniform(size=n_trials) < 0.4
    end = start[-1] + 3.0
    units = [4, 0, 6, 2, 8, 5, 1]
    nwb = nwb_file("area2-train")
    add_units(nwb, {u: spikes_of(rng, i, onset, (cond_dir // 90).astype(int) + 4 * bump, end)
                    for i, u in enumerate(units)}, {6, 1}, [[0.0, end]])
    add_trials(nwb, {"start_time": start, "stop_time": start + 1.0, "move_onset_time": onset,
                     "split": split, "cond_dir": cond_dir, "ctr_hold_bump": bump})
    add_velocity(nwb, "hand_vel", end, rng)
    folder.mkdir(parents=True, exist_ok=True)
    write(nwb, folder / "sub-H_desc-train_behavior+ecephys.nwb")
    test = nwb_file("area2-test")
    add_units(test, {u: np.sort(rng.uniform(0, 5, 40)) for u in units if u not in (6, 1)},
              set(), [[0.0, 5.0]])
    add_trials(test, {"start_time": np.array([0.5, 2.0]), "stop_time": np.array([1.5, 3.0]),
                      "move_onset_time": np.array([0.9, 2.4]), "split": np.array(["test"] * 2),
                      "cond_dir": np.array([0.0, 90.0]), "ctr_hold_bump": np.array([False] * 2)})
    write(test, folder / "sub-H_desc-test_ecephys.nwb")
    return {"onset": onset, "split": split, "cond_dir": cond_dir, "bump": bump}


def rtt_files(folder, seed: int = 2, n_segments: int = 30) -> dict:
    """MC_RTT's layout: continuous reaching cut into back-to-back 600 ms segments (no trial
    events: windows align to start_time and may run into the next segment), finger velocity
    as behaviour; the test file's segments follow the same way."""
    rng = np.random.default_rng(seed)
    # segments off the 5 ms grid by a fraction of a ms, as a recording clock makes them
    start = 0.2 + 0.6 * np.arange(n_segments) + np.round(rng.uniform(0, 0.004), 6)
    split = np.array(["train", "train", "val", "train", "none"] * n_segments)[:n_segments]
    end = start[-1] + 1.5
    units = [3, 8, 1, 6, 0, 4, 9]
    nwb = nwb_file("rtt-train")
    spikes = {u: spikes_of(rng, i, start + 0.3, np.arange(n_segments) % 4, end)
              for i, u in enumerate(units)}
    add_units(nwb, spikes, {8, 0}, [[0.0, end]])
    add_trials(nwb, {"start_time": start, "stop_time": start + 0.6, "split": split})
    add_velocity(nwb, "finger_vel", end, rng)
    folder.mkdir(parents=True, exist_ok=True)
    write(nwb, folder / "sub-Indy_desc-train_behavior+ecephys.nwb")
    test = nwb_file("rtt-test")
    t_start = 0.1 + 0.6 * np.arange(6)
    add_units(test, {u: np.sort(rng.uniform(0, 4.5, 60)) for u in units if u not in (8, 0)},
              set(), [[0.0, 4.5]])
    add_trials(test, {"start_time": t_start, "stop_time": t_start + 0.6,
                      "split": np.array(["test"] * 6)})
    write(test, folder / "sub-Indy_desc-test_ecephys.nwb")
    return {"spikes": spikes, "start": start, "split": split, "units": units}


def dmfc_spikes(rng, unit: int, sets, gos, end: float) -> np.ndarray:
    """Poisson spikes whose rate ramps from set to go at a speed set by the produced interval
    (the neural speed that tp corr measures): faster ramps before shorter tp."""
    r = np.full(int(round(end * 1000)), 6.0 + unit % 5)
    for s, g in zip(sets, gos):
        i0, i1 = int(s * 1000), int(g * 1000)
        phase = np.arange(i1 - i0) / (i1 - i0)
        r[i0:i1] += (10 + 4 * (unit % 3)) * np.sin(np.pi * phase * (1 + unit % 2)) ** 2
    n = rng.poisson(r * 0.001)
    times = np.repeat(np.arange(r.size) / 1000, n) + rng.uniform(0, 0.001, n.sum())
    return np.sort(times[times < end])


DMFC_UNITS = [5, 2, 9, 0, 7, 3, 8, 1]
DMFC_HELDOUT = {9, 1}


def dmfc_files(folder, seed: int = 4, n_trials: int = 160) -> dict:
    """DMFC_RSG's layout: ready-set-go trials with set_time and go_time, the sample interval ts
    and the produced interval tp in ms, is_eye/theta/is_short conditions (ten trials in a row
    share one), is_outlier; the test file's trials lack tp."""
    rng = np.random.default_rng(seed)
    k = np.arange(n_trials)
    cond = (k // 10) % 8
    is_eye, theta, is_short = cond % 2, 180.0 * (cond // 2 % 2), cond // 4
    ts = np.where(is_short == 1, rng.choice([560.0, 720.0], n_trials),
                  rng.choice([880.0, 1100.0], n_trials))
    tp = np.round(ts * (1 + 0.08 * rng.normal(size=n_trials)), 3)
    tp[22] = 0.6 * ts[22]  # shorter than 0.8 of its condition's mean: out of the PSTH
    start = 0.4 + 3.5 * k
    sets = start + 1.3 + np.round(rng.uniform(0, 0.3, n_trials), 6)
    gos = sets + tp / 1000
    split = np.array(["train", "val", "train", "val", "train", "train", "train", "train",
                      "train", "none"])[k % 10]
    outlier = np.zeros(n_trials)
    outlier[(k % 10 == 7) | (k == 13)] = 1
    end = start[-1] + 4.0
    spikes = {u: dmfc_spikes(rng, i, sets, gos, end) for i, u in enumerate(DMFC_UNITS)}
    nwb = nwb_file("dmfc-train")
    add_units(nwb, spikes, DMFC_HELDOUT, [[0.0, end]])
    add_trials(nwb, {"start_time": start, "stop_time": gos + 0.6, "set_time": sets,
                     "go_time": gos, "split": split, "is_eye": is_eye.astype(bool),
                     "theta": theta, "is_short": is_short.astype(bool), "ts": ts, "tp": tp,
                     "is_outlier": outlier})
    folder.mkdir(parents=True, exist_ok=True)
    write(nwb, folder / "sub-Haydn_desc-train_ecephys.nwb")
    t_start = 0.4 + 3.5 * np.arange(12)
    t_set = t_start + 1.4
    t_go = t_set + rng.uniform(0.5, 1.1, 12)
    test = nwb_file("dmfc-test")
    hin = [u for u in DMFC_UNITS if u not in DMFC_HELDOUT]
    add_units(test, {u: dmfc_spikes(rng, i, t_set, t_go, t_start[-1] + 4) for i, u in
                     enumerate(hin)}, set(), [[0.0, t_start[-1] + 4]])
    add_trials(test, {"start_time": t_start, "stop_time": t_go + 0.6, "set_time": t_set,
                      "go_time": t_go, "split": np.array(["test"] * 12),
                      "is_eye": np.zeros(12, bool), "theta": np.zeros(12),
                      "is_short": np.ones(12, bool), "ts": np.full(12, 640.0)})
    write(test, folder / "sub-Haydn_desc-test_ecephys.nwb")
    return {"spikes": spikes, "set": sets, "go": gos, "split": split, "tp": tp, "ts": ts,
            "is_eye": is_eye, "theta": theta, "is_short": is_short, "outlier": outlier,
            "test_spikes": None, "test_go": t_go}


# ---------------------------------------------------------------------------------------------
# nlb_tools' definitions, retyped


def ms_samples(times) -> np.ndarray:
    """NLB's 1 ms sample of a spike: t * 1000 rounded to 6 decimals, truncated."""
    return np.trunc(np.round(np.asarray(times) * 1000, 6)).astype(np.int64)


def first_bin(event_s: float, offset_ms: int, bin_ms: int) -> int:
    """The first bin of the grid (multiples of bin_ms from the file's zero) at or after the
    event + offset, in whole nanoseconds."""
    ns = int(round(event_s * 1e9)) + offset_ms * 10**6
    return -(-ns // (bin_ms * 10**6))


def hand_counts(spikes: dict, ids, k0: int, n_bins: int, bin_ms: int) -> np.ndarray:
    """(n_bins, N) counts of the units `ids` from grid bin k0, by histogram."""
    edges = (k0 + np.arange(n_bins + 1)) * bin_ms
    ms = [ms_samples(spikes[u]) for u in ids]  # np.histogram's last bin is closed: not NLB's
    return np.stack([np.histogram(m[m < edges[-1]], edges)[0] for m in ms], -1)


def nlb_resample(x: np.ndarray, q: int) -> np.ndarray:
    """The 1 ms series at the q ms grid, as NLB resamples continuous signals: scipy's decimate
    with an order-500 FIR filter (the series here has no gaps to interpolate)."""
    from scipy.signal import decimate

    return decimate(x, q, n=500, ftype="fir", axis=0)


def velocity(path) -> np.ndarray:
    from pynwb import NWBHDF5IO

    with NWBHDF5IO(str(path), "r") as io:
        return np.asarray(io.read().processing["behavior"]["hand_vel"].data[:])


def in_nlb_order(f) -> tuple:
    """(training trials' rows, their recon data and behaviour) in the trials table's order."""
    rows = np.r_[f["train_inds"][()], f["valid_inds"][()]]
    order = np.argsort(rows)
    rec = np.concatenate([f["train_recon_data"][()], f["valid_recon_data"][()]])[order]
    beh = np.concatenate([f["train_behavior"][()], f["valid_behavior"][()]])[order]
    return rows[order], rec, beh


def prepare(folder, dataset, phase, bin_ms, out):
    from src.nlb import prepare as run

    return run(str(folder), dataset, phase, bin_ms, str(out))


# ---------------------------------------------------------------------------------------------
# the tensors


def test_maze_val_tensors_equal_nlb_definitions_bin_for_bin(tmp_path):
    pytest.importorskip("pynwb")
    truth = maze_files(tmp_path / "dandi")
    session, target = prepare(tmp_path / "dandi", "mc_maze", "val", 5, tmp_path / "out")
    heldin = sorted(u for u in MAZE_UNITS if u not in MAZE_HELDOUT)
    ids = heldin + sorted(MAZE_HELDOUT)  # held-in then held-out, each by id
    vel = nlb_resample(velocity(next((tmp_path / "dandi").glob("*train*"))), 5)
    with h5py.File(session) as f:
        assert f["unit_ids"][()].tolist() == ids and f.attrs["n_heldin"] == len(heldin)
        rows, rec, beh = in_nlb_order(f)
        assert rows.tolist() == np.flatnonzero(truth["split"] == "train").tolist()
        assert rec.shape == (len(rows), 140 + 40, 10) and f.attrs["fp_bins"] == 40
        assert f["nlb_eval_rows"][()].tolist() == np.flatnonzero(truth["split"] == "val").tolist()
        for i, r in enumerate(rows):
            k0 = first_bin(truth["onset"][r], -250, 5)
            np.testing.assert_array_equal(rec[i], hand_counts(truth["spikes"], ids, k0, 180, 5))
            np.testing.assert_allclose(beh[i, :140], vel[k0 + 20:k0 + 160], rtol=1e-5, atol=1e-6)
            assert np.isnan(beh[i, 140:]).all()  # no behaviour is scored in the forward bins
        test = f["test_encod_data"][()]  # the val trials' held-in spikes, encoder bins only
        for i, r in enumerate(f["nlb_eval_rows"][()]):
            k0 = first_bin(truth["onset"][r], -250, 5)
            np.testing.assert_array_equal(test[i], hand_counts(truth["spikes"], heldin, k0, 140, 5))
        keys = set(f)
    # nothing of the scored trials' held-out units or forward bins is in the session file
    assert not any("eval" in k and k not in ("nlb_eval_rows",) for k in keys)
    with h5py.File(target) as f:
        g = f["mc_maze"]
        for i, r in enumerate(np.flatnonzero(truth["split"] == "val")):
            k0 = first_bin(truth["onset"][r], -250, 5)
            np.testing.assert_array_equal(g["eval_spikes_heldout"][i], hand_counts(
                truth["spikes"], sorted(MAZE_HELDOUT), k0, 140, 5))
            np.testing.assert_array_equal(g["eval_spikes_heldin_forward"][i], hand_counts(
                truth["spikes"], heldin, k0 + 140, 40, 5))


def test_test_phase_trains_on_train_and_val_and_scores_the_test_file(tmp_path, capsys):
    pytest.importorskip("pynwb")
    truth = maze_files(tmp_path / "dandi")
    session, target = prepare(tmp_path / "dandi", "mc_maze", "test", 20, tmp_path / "out")
    assert target is None and session.endswith("mc_maze_20_test.h5")
    heldin = sorted(u for u in MAZE_UNITS if u not in MAZE_HELDOUT)
    with h5py.File(session) as f:
        rows, rec, _ = in_nlb_order(f)
        assert rows.tolist() == np.flatnonzero(np.isin(truth["split"], ["train", "val"])).tolist()
        assert rec.shape[1:] == (35 + 10, 10) and f.attrs["bin_size"] == 0.02
        test = f["test_encod_data"][()]
        assert test.shape == (12, 35, len(heldin))  # the test file's 12 trials, held-in units
        for i, onset in enumerate(truth["test_onset"]):
            want = hand_counts(truth["test_spikes"], heldin, first_bin(onset, -250, 20), 35, 20)
            np.testing.assert_array_equal(test[i], want)


def test_area2_layout_lag_masks_and_psth_conditions(tmp_path):
    pytest.importorskip("pynwb")
    truth = area2_files(tmp_path / "dandi")
    session, target = prepare(tmp_path / "dandi", "area2_bump", "val", 5, tmp_path / "out")
    vel = nlb_resample(velocity(next((tmp_path / "dandi").glob("*train*"))), 5)
    train, val = (np.flatnonzero(truth["split"] == s) for s in ("train", "val"))
    with h5py.File(target) as f:
        g = f["area2_bump"]
        assert g["train_decode_mask"][()].tolist() == np.c_[~truth["bump"][train],
                                                            truth["bump"][train]].tolist()
        for i, r in enumerate(val):  # behaviour 20 ms before the rates: 4 bins earlier
            k0 = first_bin(truth["onset"][r], -100, 5)
            np.testing.assert_allclose(g["eval_behavior"][i], vel[k0 - 4:k0 + 116], rtol=1e-5,
                                       atol=1e-6)
        combos = sorted(set(zip(truth["cond_dir"][np.r_[train, val]].tolist(),
                                truth["bump"][np.r_[train, val]].tolist())))
        assert g["psth"].shape == (len(combos), 120, 7)
        for c, idx in enumerate(g["eval_cond_idx"][()]):
            assert all((truth["cond_dir"][val[i]], truth["bump"][val[i]]) == combos[c]
                       for i in idx)
    with h5py.File(session) as f:
        assert f.attrs["smoothing_kern_sd"] == 0.03 and f.attrs["smoothing_alpha"] == 0.01


def test_rtt_segments_start_time_overlap_and_finger_velocity(tmp_path):
    """MC_RTT (nlb_tools' PARAMS): windows 0 to 600 ms from start_time, overlap allowed, so
    the forward bins and the behaviour (finger_vel, 140 ms after the rates) run into the next
    segment; no PSTH conditions and no decode masks."""
    pytest.importorskip("pynwb")
    truth = rtt_files(tmp_path / "dandi")
    session, target = prepare(tmp_path / "dandi", "mc_rtt", "val", 5, tmp_path / "out")
    ids = [1, 3, 4, 6, 9, 0, 8]  # held-in then held-out, each by id
    with h5py.File(next((tmp_path / "dandi").glob("*train*"))) as f:
        raw = f["processing/behavior/finger_vel/data"][()]
    vel = nlb_resample(raw, 5)
    train, val = (np.flatnonzero(truth["split"] == s) for s in ("train", "val"))
    with h5py.File(session) as f:
        assert f["unit_ids"][()].tolist() == ids and f.attrs["n_heldin"] == 5
        rows, rec, beh = in_nlb_order(f)
        assert rows.tolist() == train.tolist() and rec.shape == (len(train), 120 + 40, 7)
        for i, r in enumerate(rows):
            k0 = first_bin(truth["start"][r], 0, 5)
            np.testing.assert_array_equal(rec[i], hand_counts(truth["spikes"], ids, k0, 160, 5))
            # 140 ms = 28 bins later, across the segment's end: overlap is allowed
            np.testing.assert_allclose(beh[i, :120], vel[k0 + 28:k0 + 148], rtol=1e-5,
                                       atol=1e-6)
        test = f["test_encod_data"][()]
        for i, r in enumerate(val):
            k0 = first_bin(truth["start"][r], 0, 5)
            np.testing.assert_array_equal(test[i], hand_counts(truth["spikes"], ids[:5], k0,
                                                               120, 5))
    with h5py.File(target) as f:
        g = f["mc_rtt"]
        assert set(g) == {"eval_spikes_heldout", "train_behavior", "eval_behavior",
                          "eval_spikes_heldin_forward", "eval_spikes_heldout_forward"}
        for i, r in enumerate(val):
            k0 = first_bin(truth["start"][r], 0, 5)
            np.testing.assert_allclose(g["eval_behavior"][i], vel[k0 + 28:k0 + 148], rtol=1e-5,
                                       atol=1e-6)
            np.testing.assert_array_equal(g["eval_spikes_heldout_forward"][i], hand_counts(
                truth["spikes"], ids[5:], k0 + 120, 40, 5))
    session, _ = prepare(tmp_path / "dandi", "mc_rtt", "test", 20, tmp_path / "out")
    with h5py.File(session) as f:
        rows, rec, beh = in_nlb_order(f)
        assert rows.tolist() == np.sort(np.r_[train, val]).tolist()  # train and val train
        assert rec.shape[1:] == (30 + 10, 7) and f["test_encod_data"].shape == (6, 30, 5)
        vel20 = nlb_resample(raw, 20)
        k0 = first_bin(truth["start"][rows[0]], 0, 20)
        np.testing.assert_allclose(beh[0, :30], vel20[k0 + 7:k0 + 37], rtol=1e-5, atol=1e-6)


def test_psth_is_nlbs_smoothed_condition_mean(tmp_path):
    """NLB smooths the whole recording at 1 ms (a Gaussian of int(6 SD) points, numpy's
    'same' convolution), sums 5 ms bins and averages the trials of each condition."""
    pytest.importorskip("pynwb")
    from scipy.signal.windows import gaussian

    truth = maze_files(tmp_path / "dandi")
    _, target = prepare(tmp_path / "dandi", "mc_maze", "val", 5, tmp_path / "out")
    ids = sorted(u for u in MAZE_UNITS if u not in MAZE_HELDOUT) + sorted(MAZE_HELDOUT)
    w = gaussian(420, 70, sym=True)
    w /= w.sum()
    n_ms = int(round(truth["end"] * 1000))
    sm = np.stack([np.convolve(np.bincount(ms_samples(truth["spikes"][u]), minlength=n_ms),
                               w, "same") for u in ids], -1)  # (S, N)
    rows = np.flatnonzero(np.isin(truth["split"], ["train", "val"]))
    key = list(zip(truth["ttype"][rows], truth["tver"][rows]))
    with h5py.File(target) as f:
        psth = f["mc_maze/psth"][()]
    for c, combo in enumerate(sorted(set(key))):
        trials = [r for r, k in zip(rows, key) if k == combo]
        k0s = [first_bin(truth["onset"][r], -250, 5) for r in trials]
        mean = np.mean([sm[k * 5:(k + 140) * 5].reshape(140, 5, -1).sum(1) for k in k0s], 0)
        np.testing.assert_allclose(psth[c], mean, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def dmfc_val(tmp_path_factory):
    """DMFC_RSG-shaped files and their val-phase session and target files (5 ms bins)."""
    pytest.importorskip("pynwb")
    folder = tmp_path_factory.mktemp("dmfc")
    truth = dmfc_files(folder / "dandi")
    session, target = prepare(folder / "dandi", "dmfc_rsg", "val", 5, folder / "out")
    return truth, session, target


def nlb_jitter(tp, split, bin_ms: int) -> np.ndarray:
    """DMFC_RSG's window shifts in bins (nlb_tools' PARAMS jitter and _prep_jitter): numpy's
    legacy generator seeded 0, one draw per trial in table order, u * floor(round(range / bin,
    4)) rounded, range = clip(1500 - tp, 0, 300) ms, 0 for test trials."""
    np.random.seed(0)
    out = []
    for t, s in zip(tp, split):
        top = np.floor(np.round((0.0 if s == "test" else np.clip(1500 - t, 0, 300)) / bin_ms, 4))
        out.append(int(np.round(np.random.random() * top)))
    return np.array(out)


def set_go(set_s: float, go_s: float, bin_ms: int) -> tuple:
    """(first bin, number of bins) of the grid bins that start at or after set and before go
    (nlb_tools slices its index from set_time to go_time less 1 us)."""
    step = bin_ms * 10**6
    s0 = -(-int(round(set_s * 1e9)) // step)
    return s0, (int(round(go_s * 1e9)) - 1000) // step - s0 + 1


def test_dmfc_jittered_windows_set_go_spikes_behaviour_and_psth(dmfc_val):
    """DMFC_RSG: windows 1500 ms before go_time, each shifted later at random (training and
    scored trials drawn separately from seed 0); forward bins from the shifted go; held-out
    spikes scored from set to go alone, lined up with the shifted window, NaN elsewhere;
    behaviour per trial; PSTHs of set to go over the non-outlier trials of each condition."""
    from scipy.signal.windows import gaussian

    truth, session, target = dmfc_val
    heldin = sorted(u for u in DMFC_UNITS if u not in DMFC_HELDOUT)
    ids = heldin + sorted(DMFC_HELDOUT)
    train, val = (np.flatnonzero(truth["split"] == s) for s in ("train", "val"))
    jit_tr, jit_ev = nlb_jitter(truth["tp"][train], "x" * len(train), 5), nlb_jitter(
        truth["tp"][val], "x" * len(val), 5)
    assert jit_tr.max() > 20 and len(set(jit_tr.tolist())) > 10  # the shift is real
    with h5py.File(session) as f:
        assert "train_behavior" not in f  # behaviour per trial: in the target, not a series
        rows = np.r_[f["train_inds"][()], f["valid_inds"][()]]
        rec = np.concatenate([f["train_recon_data"][()], f["valid_recon_data"][()]])
        rec, rows = rec[np.argsort(rows)], np.sort(rows)
        assert rows.tolist() == train.tolist() and rec.shape == (len(train), 300 + 40, 8)
        assert f["nlb_train_jitter"][()].tolist() == jit_tr.tolist()
        for i, r in enumerate(rows):
            k0 = first_bin(truth["go"][r], -1500, 5) + jit_tr[i]
            np.testing.assert_array_equal(rec[i], hand_counts(truth["spikes"], ids, k0, 340, 5))
        test = f["test_encod_data"][()]
        for i, r in enumerate(val):
            k0 = first_bin(truth["go"][r], -1500, 5) + jit_ev[i]
            np.testing.assert_array_equal(test[i], hand_counts(truth["spikes"], heldin, k0, 300,
                                                               5))
    with h5py.File(target) as f:
        g = {k: (list(v[()]) if v.dtype.kind == "O" else v[()]) for k, v in f["dmfc_rsg"].items()}
    assert g["eval_jitter"].tolist() == jit_ev.tolist() and g["eval_jitter"].dtype.kind == "i"
    cols = ("is_eye", "theta", "is_short", "ts", "tp")
    for name, r in (("train_behavior", train), ("eval_behavior", val)):
        want = np.stack([np.asarray(truth[c][r], float) for c in cols], -1)
        want[truth["outlier"][r] != 0] = np.nan
        np.testing.assert_allclose(g[name], want, rtol=1e-6)
    for i, r in enumerate(val):
        s0, n = set_go(truth["set"][r], truth["go"][r], 5)
        end = 300 - jit_ev[i]  # the bin before go sits jitter bins before the end ...
        assert first_bin(truth["go"][r], -1500, 5) + jit_ev[i] + end - 1 == s0 + n - 1  # ... in it
        want = np.full((300, 2), np.nan)
        want[end - n:end] = hand_counts(truth["spikes"], sorted(DMFC_HELDOUT), s0, n, 5)
        np.testing.assert_array_equal(g["eval_spikes_heldout"][i], want)
        k0 = first_bin(truth["go"][r], 0, 5) + jit_ev[i]  # forward bins from the shifted go
        np.testing.assert_array_equal(g["eval_spikes_heldin_forward"][i], hand_counts(
            truth["spikes"], heldin, k0, 40, 5))
    # PSTHs: the whole recording smoothed at 1 ms, 5 ms sums, set to go of each condition's
    # non-outlier trials, trials under 0.8 x the mean length out, the last min_len bins
    w = gaussian(420, 70, sym=True)
    w /= w.sum()
    n_ms = int(round(truth["spikes"][DMFC_UNITS[0]].max() * 1000)) + 2000
    sm = np.stack([np.convolve(np.bincount(ms_samples(truth["spikes"][u]), minlength=n_ms), w,
                               "same") for u in ids], -1)
    both = np.r_[train, val]
    key = [tuple(float(truth[c][r]) for c in cols[:4]) for r in both]
    combos = sorted(set(key))
    assert g["psth"].shape == (len(combos), 300, 8)
    for c, combo in enumerate(combos):
        members = [i for i, k in enumerate(key) if k == combo and truth["outlier"][both[i]] != 1]
        spans = [set_go(truth["set"][both[i]], truth["go"][both[i]], 5) for i in members]
        lens = np.array([n for _, n in spans])
        kept = [m for m, n in zip(members, lens) if n >= 0.8 * lens.mean()]
        n = lens[lens >= 0.8 * lens.mean()].min()
        ends = [s0 + ln for (s0, ln), ln0 in zip(spans, lens) if ln0 >= 0.8 * lens.mean()]
        mean = np.mean([sm[(e - n) * 5:e * 5].reshape(n, 5, -1).sum(1) for e in ends], 0)
        assert np.isnan(g["psth"][c, :300 - n]).all()
        np.testing.assert_allclose(g["psth"][c, 300 - n:], mean, rtol=1e-4, atol=1e-6)
        idx = np.r_[g["train_cond_idx"][c], len(train) + g["eval_cond_idx"][c]]
        assert sorted(idx.tolist()) == kept
    short = train.tolist().index(22)  # the trial whose tp is 0.6 ts: out of every PSTH
    assert not any(short in x.tolist() for x in g["train_cond_idx"])


# ---------------------------------------------------------------------------------------------
# the scores


def nlb_bits_per_spike(rates, spikes) -> float:
    """NLB's co-bps: Poisson log-likelihoods with the log k! term, against each neuron's mean
    over trials and bins, in bits per spike."""
    from scipy.special import gammaln

    nll = lambda r, k: np.sum(r - k * np.log(r) + gammaln(k + 1))  # noqa: E731
    null = np.broadcast_to(spikes.mean(axis=(0, 1), keepdims=True), spikes.shape)
    return (nll(null, spikes) - nll(rates, spikes)) / spikes.sum() / np.log(2)


def r2_mean(true, pred) -> float:
    """R2 per column over the rows, averaged (scikit-learn's r2_score)."""
    sse = ((true - pred) ** 2).sum(0)
    sst = ((true - true.mean(0)) ** 2).sum(0)
    return float(np.mean(1 - sse / sst))


def test_scores_equal_nlbs_formulas():
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV

    from src.nlb import evaluate

    rng = np.random.default_rng(3)
    truth = rng.uniform(0.05, 0.6, (12, 20, 6))  # (K_e, T, N)
    sub = {"eval_rates_heldin": truth[..., :4] * 1.1, "eval_rates_heldout": truth[..., 4:] * 0.9,
           "train_rates_heldin": rng.uniform(0.1, 0.5, (30, 20, 4)),
           "train_rates_heldout": rng.uniform(0.1, 0.5, (30, 20, 2)),
           "eval_rates_heldin_forward": rng.uniform(0.1, 0.5, (12, 5, 4)),
           "eval_rates_heldout_forward": rng.uniform(0.1, 0.5, (12, 5, 2))}
    tr = np.concatenate([sub["train_rates_heldin"], sub["train_rates_heldout"]], -1)
    beh = lambda r: r @ rng.normal(size=(6, 2)) + 0.1 * rng.normal(size=r.shape[:2] + (2,))  # noqa: E731
    target = {"eval_spikes_heldout": rng.poisson(truth[..., 4:]).astype(float),
              "train_behavior": beh(tr), "eval_behavior": beh(truth),
              "eval_spikes_heldin_forward": rng.poisson(0.3, (12, 5, 4)).astype(float),
              "eval_spikes_heldout_forward": rng.poisson(0.3, (12, 5, 2)).astype(float),
              "psth": np.stack([truth[:6].mean(0), truth[6:].mean(0)]),
              "eval_cond_idx": [np.arange(6), np.arange(6, 12)]}
    target["train_behavior"][0, :3] = np.nan  # bins without behaviour are left out
    got = evaluate(target, sub)
    ev = np.concatenate([sub["eval_rates_heldin"], sub["eval_rates_heldout"]], -1)
    assert got["co_bps"] == pytest.approx(nlb_bits_per_spike(sub["eval_rates_heldout"],
                                                             target["eval_spikes_heldout"]))
    fwd = lambda d, p: np.concatenate([d[f"eval_{p}_heldin_forward"],  # noqa: E731
                                       d[f"eval_{p}_heldout_forward"]], -1)
    assert got["fp_bps"] == pytest.approx(nlb_bits_per_spike(fwd(sub, "rates"),
                                                             fwd(target, "spikes")))
    pred = np.vstack([ev[:6].mean(0), ev[6:].mean(0)])
    assert got["psth_r2"] == pytest.approx(r2_mean(target["psth"].reshape(-1, 6), pred))
    x, y = tr.reshape(-1, 6)[3:], target["train_behavior"].reshape(-1, 2)[3:]
    gs = GridSearchCV(Ridge(), {"alpha": np.logspace(-4, 0, 9)}, cv=5).fit(x, y)
    yp = gs.best_estimator_.predict(ev.reshape(-1, 6))
    assert got["vel_r2"] == pytest.approx(r2_mean(target["eval_behavior"].reshape(-1, 2), yp))


def test_dmfc_scores_and_submission_equal_nlbs(dmfc_val, tmp_path):
    """DMFC_RSG's scores as NLB's evaluation computes them: co-bps over the bins that are not
    NaN (set to go), the null model's means over those bins; tp corr instead of vel R2; PSTH
    R2 of rates moved later by each trial's jitter. `submit` writes them for a run."""
    from scipy.special import gammaln
    from scipy.stats import pearsonr

    from src.nlb import RATE_KEYS, main, read_group

    truth, session, target = dmfc_val
    with h5py.File(session) as f:
        n_tr, n_ev = len(f["nlb_train_rows"]), len(f["nlb_eval_rows"])
    rng = np.random.default_rng(5)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": session}))
    with h5py.File(session) as f, h5py.File(run / "lfads_output.h5", "w") as out:
        for name in ("train", "valid", "test"):  # a stand-in run's rates
            k = len(f[f"{name}_inds"]) if name != "test" else n_ev
            out[f"{name}_rates"] = rng.uniform(0.02, 0.4, (k, 340, 8)).astype(np.float32)
    assert main(["submit", str(run), "--out", str(tmp_path / "sub.h5")]) == 0
    scores = json.loads((run / "nlb_scores.json").read_text())
    assert set(scores) == {"dataset", "co_bps", "tp_corr", "psth_r2", "fp_bps"}
    sub = read_group(str(tmp_path / "sub.h5"), "dmfc_rsg")
    assert {k: sub[k].shape for k in RATE_KEYS} == {
        "train_rates_heldin": (n_tr, 300, 6), "train_rates_heldout": (n_tr, 300, 2),
        "eval_rates_heldin": (n_ev, 300, 6), "eval_rates_heldout": (n_ev, 300, 2),
        "eval_rates_heldin_forward": (n_ev, 40, 6), "eval_rates_heldout_forward": (n_ev, 40, 2)}
    g = read_group(target, "dmfc_rsg")
    spikes, rates = g["eval_spikes_heldout"].astype(float), sub["eval_rates_heldout"].astype(float)
    assert 0 < np.isnan(spikes).mean() < 1
    ok = ~np.isnan(spikes)  # NLB drops NaN elements, then counts and averages the rest
    null = np.broadcast_to(np.nanmean(spikes, axis=(0, 1), keepdims=True), spikes.shape)[ok]
    nll = lambda r, k: np.sum(r - k * np.log(r) + gammaln(k + 1))  # noqa: E731
    want = (nll(null, spikes[ok]) - nll(rates[ok], spikes[ok])) / np.nansum(spikes) / np.log(2)
    assert scores["co_bps"] == pytest.approx(want, rel=1e-9)
    ev = np.concatenate([sub["eval_rates_heldin"], sub["eval_rates_heldout"]], -1).astype(float)
    speed = [np.mean(np.linalg.norm(np.diff(r[m[:, 0]], axis=0), axis=1)) for r, m in zip(ev, ok)]
    beh = g["eval_behavior"]
    conds = {tuple(b[:3]) for b in beh if not np.isnan(b[:3]).all()}
    rs = [pearsonr(np.array(speed)[(beh[:, :3] == c).all(1)], beh[(beh[:, :3] == c).all(1), 4])[0]
          for c in conds]
    assert len(conds) == 8 and scores["tp_corr"] == pytest.approx(np.mean(rs), rel=1e-9)
    moved = np.full_like(ev, np.nan)
    for i, j in enumerate(g["eval_jitter"]):
        moved[i, j:] = ev[i, :300 - j]
    psth = g["psth"].astype(float)  # NLB's evaluation reads float64
    true = np.vstack([psth[c][~np.isnan(psth[c, :, 0])]
                      for c, x in enumerate(g["eval_cond_idx"]) if len(x)])
    pred = np.vstack([moved[x].mean(0)[~np.isnan(psth[c, :, 0])]
                      for c, x in enumerate(g["eval_cond_idx"]) if len(x)])
    assert scores["psth_r2"] == pytest.approx(r2_mean(true, pred), rel=1e-9)
    fwd = lambda d, p: np.concatenate([d[f"eval_{p}_heldin_forward"],  # noqa: E731
                                       d[f"eval_{p}_heldout_forward"]], -1).astype(float)
    assert scores["fp_bps"] == pytest.approx(nlb_bits_per_spike(fwd(sub, "rates"),
                                                                fwd(g, "spikes")), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# train, submit, score


def test_train_submit_and_score_end_to_end(tmp_path, capsys):
    pytest.importorskip("pynwb")
    from src.main import main as train
    from src.nlb import RATE_KEYS, main

    maze_files(tmp_path / "maze")
    area2_files(tmp_path / "area2")
    common = ["--max_steps", "10", "--eval_every", "5", "--no-plots", "--results-dir",
              str(tmp_path / "runs"), *TINY_MODEL]
    sub = tmp_path / "submission.h5"
    for name, folder, ds in (("m", "maze", "mc_maze"), ("a", "area2", "area2_bump")):
        assert main(["prepare", str(tmp_path / folder), "--dataset", ds, "--phase", "val",
                     "--out-dir", str(tmp_path / "data")]) == 0
        assert train(["--data", str(tmp_path / "data" / f"{ds}_val.h5"), "--run", name,
                      *common]) == 0
        assert main(["submit", str(tmp_path / "runs" / name), "--out", str(sub)]) == 0
        out = capsys.readouterr().out
        assert "NLB's scores on the val trials: co_bps" in out
        scores = json.loads((tmp_path / "runs" / name / "nlb_scores.json").read_text())
        assert set(scores) == {"dataset", "co_bps", "vel_r2", "psth_r2", "fp_bps"}
        assert all(np.isfinite(v) for k, v in scores.items() if k != "dataset")
        summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
        assert np.isfinite(summary["valid_co_bps_smoothing"])
        assert "valid_co_bps_smoothing" in out or "valid_co_bps_smoothing" in str(summary)
    with h5py.File(sub) as f:  # both datasets in one file, as EvalAI takes them
        assert set(f) == {"mc_maze", "area2_bump"}
        shapes = {"mc_maze": (32, 8, 140, 40, 7, 3), "area2_bump": (30, 10, 120, 40, 5, 2)}
        for ds, (k, ke, t, fp, n_in, n_out) in shapes.items():
            g = f[ds]
            assert set(g) == set(RATE_KEYS)
            want = {"train_rates_heldin": (k, t, n_in), "train_rates_heldout": (k, t, n_out),
                    "eval_rates_heldin": (ke, t, n_in), "eval_rates_heldout": (ke, t, n_out),
                    "eval_rates_heldin_forward": (ke, fp, n_in),
                    "eval_rates_heldout_forward": (ke, fp, n_out)}
            assert {key: g[key].shape for key in g} == want
            assert all(g[key].dtype == np.float32 for key in g)
    with h5py.File(tmp_path / "runs" / "m" / "lfads_output.h5") as f, h5py.File(sub) as s:
        np.testing.assert_array_equal(s["mc_maze/eval_rates_heldout"][()],
                                      f["test_rates"][:, :140, 7:])


def test_errors_name_what_is_wrong(tmp_path, capsys):
    pytest.importorskip("pynwb")
    from src.nlb import main

    (tmp_path / "empty").mkdir()
    cases = [(["prepare", str(tmp_path / "nowhere"), "--dataset", "mc_maze"],
              "nowhere: no such folder (download the dandiset 000128"),
             (["prepare", str(tmp_path / "empty"), "--dataset", "mc_rtt"],
              "expected one train .nwb file with '' in its name, found 0"),
             (["submit", str(tmp_path / "empty")], "no config.json: not a run folder")]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
