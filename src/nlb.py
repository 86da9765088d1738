"""The Neural Latents Benchmark (NLB'21) end to end: its data as a session file, its submission
file, and its own scores (docs/nlb.md).

    python -m src.nlb prepare DANDI_FOLDER --dataset mc_maze --phase val --out-dir data/nlb
    python -m src.main --data data/nlb/mc_maze_val.h5
    python -m src.nlb submit results/<run> --out submission.h5

`prepare` writes exactly the tensors of nlb_tools' make_train_input_tensors and
make_eval_input_tensors for the dataset and phase: the file's own `split` (val phase: train
trials train, val trials are scored; test phase: train and val trials train, the test file's
trials are scored), NLB's alignment and window, its forward-prediction bins, behaviour with
its lag, on the 5 ms (or 20 ms) grid of the file's clock, held-in then held-out units each in
ascending id. NLB's training trials become the session's train and valid splits (our own
validation split, drawn inside them); the scored trials' held-in spikes become
`test_encod_data`, read only to export their rates: their held-out neurons and forward bins
reach neither training nor model selection. In the val phase a target file
<out-dir>/<name>_target.h5 holds what NLB scores against (nlb_tools' make_eval_target_tensors).

`submit` writes NLB's submission group from a run's posterior-averaged rates and, in the val
phase, scores it as NLB's evaluation does: RUN_DIR/nlb_scores.json.
"""

import glob
import json
import os
import sys
import time
from dataclasses import dataclass

import h5py
import numpy as np

from src.binning import bin_spikes, smallest_uint, split_trials
from src.data import DataError
from src.prep_nwb import (
    behaviour_series,
    column,
    inside_observed,
    observed_intervals,
    open_nwb,
    ragged,
    series_times,
    write_session,
)
from src.utils import FlagParser, HelpFormatter, atomic_path

# Legend: K trials, T bins of a window, F forward-prediction bins, N units (N_in held in,
# N_out held out), D behaviour dimensions, C PSTH conditions, S 1 ms samples.


@dataclass(frozen=True)
class Spec:
    """One NLB'21 dataset. Retyped from nlb_tools 0.0.4's make_tensors.PARAMS (windows, lags,
    PSTH conditions and kernels, forward bins, overlap rules; DMFC_RSG's jitter, per-trial
    behaviour, outlier masks and set-to-go spans) and the smoothing baseline's
    examples/baselines/smoothing/run_smoothing.py (kernel SD and GLM penalty); the dandisets
    from the DANDI Archive."""
    dandiset: str  # DANDI Archive id
    file_key: str  # what the file names hold besides "train"/"test" ("" for any)
    align: str  # trials column the windows are aligned to
    window_ms: tuple  # (start, end) ms around it
    behaviour: str  # processing['behavior'] series decoded for vel R2
    lag_ms: int  # behaviour lags the rates by this much
    overlap: tuple  # (training, evaluated) windows may run into the next trial's
    psth_conds: tuple = ()  # trials columns whose value combinations are the PSTH conditions
    psth_sd_ms: int = 0  # Gaussian SD of the 1 ms spikes the PSTHs average
    decode_mask: str = ""  # boolean trials column: one decoder per value (Area2_Bump)
    fp_ms: int = 200  # forward-prediction span after the window
    smoothing: tuple = (50, 0.01)  # the smoothing baseline's kernel SD in ms and GLM penalty
    trial_behaviour: tuple = ()  # trials columns scored per trial instead of a series (tp corr)
    outlier: str = ""  # trials column: rows where it is not 0 lose behaviour, 1 their PSTH
    jitter_ms: tuple = ()  # (interval, cap) ms: windows shift later, up to clip(interval - tp)
    scored_from: str = ""  # trials column where the scored held-out spikes begin (NaN before)


MAZE = dict(align="move_onset_time", window_ms=(-250, 450), behaviour="hand_vel",
            overlap=(False, False), psth_conds=("trial_type", "trial_version"))
DATASETS = {
    "mc_maze": Spec("000128", "ses-full", lag_ms=100, psth_sd_ms=70, smoothing=(50, 0.01),
                    **MAZE),
    "mc_rtt": Spec("000129", "", "start_time", (0, 600), "finger_vel", 140, (True, True),
                   smoothing=(30, 0.1)),
    "area2_bump": Spec("000127", "", "move_onset_time", (-100, 500), "hand_vel", -20,
                       (False, True), ("cond_dir", "ctr_hold_bump"), 40, "ctr_hold_bump",
                       smoothing=(30, 0.01)),
    "mc_maze_large": Spec("000138", "ses-large", lag_ms=120, psth_sd_ms=50,
                          smoothing=(40, 0.1), **MAZE),
    "mc_maze_medium": Spec("000139", "ses-medium", lag_ms=120, psth_sd_ms=50,
                           smoothing=(60, 0.1), **MAZE),
    "mc_maze_small": Spec("000140", "ses-small", lag_ms=120, psth_sd_ms=50,
                          smoothing=(60, 0.1), **MAZE),
    # windows end at go, shifted later at random; held-out spikes and PSTHs cover set to go
    "dmfc_rsg": Spec("000130", "", "go_time", (-1500, 0), "", 0, (True, True),
                     ("is_eye", "theta", "is_short", "ts"), 70, smoothing=(60, 0.001),
                     trial_behaviour=("is_eye", "theta", "is_short", "ts", "tp"),
                     outlier="is_outlier", jitter_ms=(1500, 300), scored_from="set_time"),
}
RATE_KEYS = ("train_rates_heldin", "train_rates_heldout", "eval_rates_heldin",
             "eval_rates_heldout", "eval_rates_heldin_forward", "eval_rates_heldout_forward")
RIDGE_ALPHAS = np.logspace(-4, 0, 9)  # nlb_tools' evaluation: velocity decoder's grid, 5 folds


def group_name(dataset: str, bin_ms: int) -> str:
    """The submission's group: the dataset, with _20 for 20 ms bins (nlb_tools' evaluate)."""
    return dataset if bin_ms == 5 else f"{dataset}_{bin_ms}"


# ---------------------------------------------------------------------------------------------
# reading an NLB file


@dataclass
class Recording:
    path: str
    ids: np.ndarray  # (U,) unit ids of the units table
    heldout: np.ndarray  # (U,) bool, the `heldout` column (all False in a test file)
    spike_ms: np.ndarray  # (S,) 1 ms sample of each spike: NLB's truncation of t * 1000
    spike_row: np.ndarray  # (S,) the units-table row of each spike
    observed: list  # [(n, 2) seconds]: the distinct observed intervals of the units
    end_ms: int  # 1 ms samples of the recording: the last observed instant
    trials: dict  # column -> (R,) values of the trials table; "split" as str
    behaviour: np.ndarray | None  # (end_ms, D) the behaviour series at 1 ms, NaN unsampled
    behaviour_names: list  # D names
    behaviour_units: str


def read_recording(path: str, spec: Spec, with_behaviour: bool) -> Recording:
    with open_nwb(path) as io:
        nwb = io.read()
        units = nwb.units
        if units is None or len(units) == 0 or nwb.trials is None:
            raise DataError(f"{path}: not an NLB file: it needs a units table and trials")
        ids = np.asarray(units.id[:])
        heldout = (column(units, "heldout", "unit", path).astype(bool)
                   if "heldout" in units.colnames else np.zeros(len(ids), bool))
        times, rows = ragged(units, "spike_times")
        observed = observed_intervals(nwb, range(len(ids)))
        if observed is None:
            raise DataError(f"{path}: the units table has no obs_intervals column; NLB's files "
                            "have one and its tools need it")
        end_ms = int(round(max(iv[:, 1].max(initial=0) for iv in observed) * 1000))
        trials = read_trials(nwb, path)
        beh = read_behaviour(nwb, spec, end_ms, path) if with_behaviour else (None, [], "")
    # nlb_tools bins 1 ms samples by truncating t * 1000 rounded to 6 decimals
    spike_ms = np.trunc(np.round(np.asarray(times, np.float64) * 1000, 6)).astype(np.int64)
    return Recording(path, ids, heldout, spike_ms, rows, observed, end_ms, trials, *beh)


def read_trials(nwb, path: str) -> dict:
    """Every one-value-per-row column of the trials table; text as str."""
    out = {}
    for col in nwb.trials.colnames:
        v = np.asarray(nwb.trials[col].data[:])
        if v.ndim == 1 and len(v) == len(nwb.trials):
            out[col] = (np.array([x.decode() if isinstance(x, bytes) else str(x) for x in v])
                        if v.dtype.kind in "OSU" else v)
    if "split" not in out:
        raise DataError(f"{path}: the trials table has no 'split' column: not an NLB file")
    return out


def read_behaviour(nwb, spec: Spec, end_ms: int, path: str) -> tuple:
    """(values (S, D) at 1 ms, NaN where unsampled; names; units) of spec.behaviour, whose
    samples must lie on the 1 ms grid (nlb_tools drops a series that does not)."""
    try:
        [(name, ts)] = behaviour_series(nwb, (spec.behaviour,))
    except ValueError as e:
        raise DataError(f"{path}: {e}") from e
    t = series_times(ts)
    ms = np.round(t * 1000, 3)
    if np.any(np.abs(ms - np.round(ms)) > 1e-3):
        raise DataError(f"{path}: behaviour {name} is not sampled on a 1 ms grid")
    x = np.asarray(ts.data[:], np.float64).reshape(len(t), -1)  # (samples, D)
    ms = np.round(ms).astype(np.int64)
    out = np.full((max(end_ms, int(ms.max(initial=-1)) + 1), x.shape[1]), np.nan)
    out[ms[ms >= 0]] = x[ms >= 0]
    comments = str(getattr(ts, "comments", "") or "")
    cols = comments.split("[")[-1].split("]")[0].split(",") if "columns=" in comments else []
    if len(cols) != x.shape[1]:
        cols = [str(i) for i in range(x.shape[1])]
    return out, [f"{name}_{c.strip()}" for c in cols], str(ts.unit)


def find_files(folder: str, spec: Spec) -> tuple:
    """(train file, test file) of a downloaded dandiset: the .nwb files under `folder` whose
    names hold 'train' or 'test' (and the scaled mazes' session key)."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder (download the dandiset {spec.dandiset} "
                        "first: docs/nlb.md)")
    found = []
    for kind in ("train", "test"):
        names = sorted(p for p in glob.glob(os.path.join(folder, "**", "*.nwb"), recursive=True)
                       if kind in os.path.basename(p) and spec.file_key in os.path.basename(p))
        if len(names) != 1:
            raise DataError(f"{folder}: expected one {kind} .nwb file with '{spec.file_key}' "
                            f"in its name, found {len(names)}: {', '.join(names) or 'none'}")
        found.append(names[0])
    return tuple(found)


# ---------------------------------------------------------------------------------------------
# windows on the grid


def first_bins(align_s: np.ndarray, offset_ms: int, bin_ms: int) -> np.ndarray:
    """(K,) grid bin of each window's first bin: the first bin that starts at or after the
    event + offset (nlb_tools slices its time index from there), in whole nanoseconds as
    pandas converts the seconds."""
    ns = np.round(np.asarray(align_s, np.float64) * 1e9).astype(np.int64) + offset_ms * 10**6
    step = bin_ms * 10**6
    return -((-ns) // step)  # ceil


def window_observed(rec: Recording, k0: np.ndarray, n_bins: int, bin_ms: int) -> np.ndarray:
    """(K,) bool: bins k0 .. k0 + n_bins - 1 lie inside the units' observed intervals."""
    return inside_observed(k0 * bin_ms / 1000, (k0 + n_bins) * bin_ms / 1000, rec.observed)


def kept_bins(rec: Recording, w, start_ms: int, n_bins: int, bin_ms: int) -> np.ndarray:
    """(K,) bins of each window that nlb_tools keeps where windows may not overlap: those that
    start before the next window's trial's event + start_ms and before the start of the trial
    after that one (make_trial_data's bound); w: the windows, in table order."""
    start_ns = np.round(rec.trials["start_time"].astype(np.float64) * 1e9)
    after = np.r_[start_ns[1:], np.nan][w.rows]  # (K,) the start of the trial after each one
    nxt = w.align_ns + start_ms * 1e6  # (K,) where each window's own range starts
    bound = np.fmin(np.r_[after[1:], np.nan], np.r_[nxt[1:], np.nan])  # of the next window
    t_ns = (w.k0[:, None] + np.arange(n_bins)) * (bin_ms * 1e6)  # (K, T) bin starts
    inside = (t_ns < bound[:, None]).sum(axis=1)
    return np.where(np.isnan(bound), n_bins, inside)


@dataclass
class Windows:
    """The windows of one set of trials (NLB's training trials, or the scored ones)."""
    rows: np.ndarray  # (K,) rows of the trials table, in table order
    align_ns: np.ndarray  # (K,) the event, in nanoseconds
    k0: np.ndarray  # (K,) first grid bin of the window (jitter included)
    jitter: np.ndarray  # (K,) bins the window is shifted later than the event's (DMFC_RSG)


def need_columns(rec: Recording, names) -> None:
    missing = [c for c in names if c and c not in rec.trials]
    if missing:
        raise DataError(f"{rec.path}: the trials table has no column {', '.join(missing)}")


def jitter_bins(rec: Recording, spec: Spec, rows: np.ndarray, bin_ms: int) -> np.ndarray:
    """(R,) bins each window of `rows` (one set of splits, table order) shifts later. NLB
    draws round(u * floor(round(span / bin, 4))) per row, u from numpy's legacy generator
    seeded 0 for each set, span = clip(interval - tp, 0, cap) ms and 0 for test trials
    (nlb_tools' PARAMS['dmfc_rsg']['jitter'] and _prep_jitter). NaN where tp is missing."""
    if not spec.jitter_ms:
        return np.zeros(len(rows))
    interval, cap = spec.jitter_ms
    tp = rec.trials["tp"][rows].astype(np.float64) if "tp" in rec.trials else np.nan
    span = np.where(rec.trials["split"][rows] == "test", 0.0, np.clip(interval - tp, 0, cap))
    top = np.floor(np.round(span / bin_ms, 4))
    return np.round(np.random.RandomState(0).random_sample(len(rows)) * top)


def windows(rec: Recording, spec: Spec, splits: tuple, n_bins: int, bin_ms: int,
            notes: list) -> Windows:
    """The trials of `splits` with an event and a window of n_bins inside the observed
    intervals (nlb_tools drops trials without the event too)."""
    need_columns(rec, (spec.align,))
    split, event = rec.trials["split"], rec.trials[spec.align].astype(np.float64)
    want = np.isin(split, splits)
    if not want.any():
        raise DataError(f"{rec.path}: no trial has split {' or '.join(splits)}")
    rows = np.flatnonzero(want)
    jit = jitter_bins(rec, spec, rows, bin_ms)  # drawn before any trial is dropped, as NLB
    missing = ~np.isfinite(event[rows])
    if missing.any():
        note(notes, f"{missing.sum()} {'/'.join(splits)} trials dropped: no {spec.align}")
    no_tp = ~missing & ~np.isfinite(jit)
    if no_tp.any():
        note(notes, f"{no_tp.sum()} {'/'.join(splits)} trials dropped: no tp for the jitter")
    rows, jit = rows[~missing & ~no_tp], jit[~missing & ~no_tp].astype(np.int64)
    k0 = first_bins(event[rows], spec.window_ms[0], bin_ms) + jit
    ok = window_observed(rec, k0, n_bins, bin_ms)
    if not ok.all():
        note(notes, f"{(~ok).sum()} {'/'.join(splits)} trials dropped: their window leaves the "
                    "units' observed intervals")
    rows, k0, jit = rows[ok], k0[ok], jit[ok]
    return Windows(rows, np.round(event[rows] * 1e9), k0, jit)


def note(notes: list, text: str) -> None:
    print(f"note: {text}", file=sys.stderr)
    notes.append(text)


# ---------------------------------------------------------------------------------------------
# tensors


def unit_order(rec: Recording) -> tuple:
    """(held-in rows, held-out rows) of the units table, each in ascending unit id (the
    column order of nlb_tools' tensors)."""
    out = []
    for flag in (False, True):
        rows = np.flatnonzero(rec.heldout == flag)
        out.append(rows[np.argsort(rec.ids[rows], kind="stable")])
    return tuple(out)


def counts(rec: Recording, units: np.ndarray, k0: np.ndarray, n_bins: int,
           bin_ms: int) -> np.ndarray:
    """(K, n_bins, N) spike counts from grid bin k0: whole milliseconds, so exact."""
    return bin_spikes(rec.spike_ms.astype(np.float64), rec.spike_row, units, k0 * bin_ms,
                      n_bins, float(bin_ms))


def resample(x: np.ndarray, q: int) -> np.ndarray:
    """A 1 ms series (S, D) at the grid of q ms bins, as nlb_tools resamples behaviour: gaps
    linearly interpolated (ends held), an order-500 FIR anti-aliasing decimation by q
    (scipy's decimate), and NaN again where the grid's own sample was NaN."""
    from scipy.signal import decimate

    nan = np.isnan(x)
    x = x.copy()
    for d in np.flatnonzero(nan.any(axis=0) & ~nan.all(axis=0)):
        ok = ~nan[:, d]
        x[nan[:, d], d] = np.interp(np.flatnonzero(nan[:, d]), np.flatnonzero(ok), x[ok, d])
    if q == 1:
        return x
    y = decimate(x, q, n=500, ftype="fir", axis=0)  # (ceil(S / q), D)
    y[nan[::q]] = np.nan
    return y


def behaviour_bins(rec: Recording, spec: Spec, w: Windows, n_bins: int, bin_ms: int,
                   overlap: bool, grid=None) -> np.ndarray:
    """(K, n_bins, D) behaviour lagged by spec.lag_ms (bin t holds the behaviour at t + lag),
    NaN past the recording or, where windows may not overlap, past the next window."""
    grid = resample(rec.behaviour, bin_ms) if grid is None else grid  # (S_bins, D)
    lag = int(round(spec.lag_ms / bin_ms))
    idx = w.k0[:, None] + lag + np.arange(n_bins)  # (K, T)
    valid = (idx >= 0) & (idx < len(grid))
    if not overlap:
        shifted = Windows(w.rows, w.align_ns, w.k0 + lag, w.jitter)
        keep = kept_bins(rec, shifted, spec.window_ms[0] + spec.lag_ms, n_bins, bin_ms)
        valid &= np.arange(n_bins) < keep[:, None]
    out = np.full(idx.shape + (grid.shape[1],), np.nan)
    out[valid] = grid[idx[valid]]
    return out


def check_no_cut(rec: Recording, spec: Spec, w: Windows, n_bins: int, bin_ms: int,
                 overlap: bool) -> None:
    """nlb_tools cannot stack windows it cuts short at the next trial: refuse them too."""
    if overlap:
        return
    cut = kept_bins(rec, w, spec.window_ms[0], n_bins, bin_ms) < n_bins
    if cut.any():
        raise DataError(f"{rec.path}: the windows of trial rows {w.rows[cut][:5].tolist()} run "
                        "into the next trial's; NLB's own tools cannot stack them either")


# ---------------------------------------------------------------------------------------------
# PSTHs: nlb_tools smooths the 1 ms spikes of the whole recording, then sums them into bins


def observed_ms(rec: Recording, samples: np.ndarray) -> np.ndarray:
    """(S,) bool: 1 ms samples inside every unit's observed intervals (nlb_tools' mask: from
    ceil(start * 1000) to floor(stop * 1000), whole samples)."""
    ok = (samples >= 0) & (samples < rec.end_ms)
    for iv in rec.observed:
        lo = np.ceil(np.round(iv[:, 0] * 1000, 6))
        hi = np.floor(np.round(iv[:, 1] * 1000, 6))
        ok &= ((samples[:, None] >= lo) & (samples[:, None] < hi)).any(axis=1)
    return ok


def smoothed_bins(rec: Recording, units: np.ndarray, k0: np.ndarray, n_bins: int, bin_ms: int,
                  sd_ms: int, chunk: int = 64) -> np.ndarray:
    """(K, n_bins, N) the spikes smoothed at 1 ms with nlb_tools' kernel (int(6 SD) points,
    'same' convolution, zeros outside the observed intervals) and summed into the bins.
    Only each window and the kernel's reach around it are smoothed: the same numbers."""
    from scipy.signal import oaconvolve
    from scipy.signal.windows import gaussian

    w = gaussian(int(6 * sd_ms), sd_ms, sym=True)
    w /= w.sum()
    c = (len(w) - 1) // 2  # 'same' keeps full[c : c + S]
    before, span = len(w) - 1 - c, n_bins * bin_ms  # samples read before the window, its span
    out = np.empty((len(k0), n_bins, len(units)))
    for i in range(0, len(k0), chunk):
        s0 = k0[i:i + chunk] * bin_ms - before  # (k,) first sample read
        x = counts(rec, units, s0, span + before + c, 1).astype(np.float64)  # (k, L, N)
        seen = observed_ms(rec, (s0[:, None] + np.arange(x.shape[1])).ravel())  # (k * L,)
        x[~seen.reshape(x.shape[:2])] = 0
        full = oaconvolve(x, w[None, :, None], mode="full", axes=1)
        sm = np.clip(full[:, before + c:before + c + span], 0, None)  # FFT can dip below 0
        out[i:i + chunk] = sm.reshape(len(s0), n_bins, bin_ms, -1).sum(axis=2)
    return out


def conditions(rec: Recording, spec: Spec, rows: np.ndarray) -> tuple:
    """(sorted condition tuples among `rows`, (R,) condition of each row or -1): nlb_tools
    sorts the distinct value combinations of the condition columns, NaN ones left out."""
    cols = [rec.trials[c][rows] for c in spec.psth_conds]
    keys = [tuple(v.item() if hasattr(v, "item") else v for v in t) for t in zip(*cols)]
    good = [k for k in keys if not any(isinstance(v, float) and np.isnan(v) for v in k)]
    combos = sorted(set(good))
    index = {k: i for i, k in enumerate(combos)}
    return combos, np.array([index.get(k, -1) for k in keys], dtype=np.int64)


def condition_mean(sm: np.ndarray, offset: np.ndarray, bin_ms: int) -> np.ndarray:
    """(T, N) PSTH of one condition's trials (k, T, N): nlb_tools averages the bins that share
    a time from the event's bin (event rounded up to the grid), in time order, and keeps the
    first T. Where the window's start is not a whole number of bins from the event (20 ms
    bins, 250 ms before it) trials differ in that time and a row averages only some of them."""
    t = offset[:, None] + np.arange(sm.shape[1]) * bin_ms  # (k, T) ms from the event's bin
    times = np.unique(t)[:sm.shape[1]]
    return np.stack([sm[t == u].mean(axis=0) for u in times])


def psth_target(rec: Recording, spec: Spec, units, train: Windows, evals: Windows,
                n_bins: int, bin_ms: int) -> dict:
    """NLB's PSTHs (C, T, N) of all units over the training and scored trials, and the
    positions of each condition's training and scored trials (nlb_tools' _make_psth)."""
    rows, k0 = np.r_[train.rows, evals.rows], np.r_[train.k0, evals.k0]
    combos, cond = conditions(rec, spec, rows)
    sm = smoothed_bins(rec, units, k0, n_bins, bin_ms, spec.psth_sd_ms)
    step = bin_ms * 10**6
    event_bin = -((-np.r_[train.align_ns, evals.align_ns].astype(np.int64)) // step)  # ceil
    offset = (k0 - event_bin) * bin_ms  # (K,) ms from the event's bin to the first bin
    used = [c for c in range(len(combos)) if (cond == c).any()]
    n_tr = len(train.rows)
    return {"psth": np.stack([condition_mean(sm[cond == c], offset[cond == c], bin_ms)
                              for c in used]),
            "train_cond_idx": [np.flatnonzero(cond[:n_tr] == c) for c in used],
            "eval_cond_idx": [np.flatnonzero(cond[n_tr:] == c) for c in used]}


# ---------------------------------------------------------------------------------------------
# DMFC_RSG: behaviour per trial, scored spikes and PSTHs from set to go


def trial_behaviour(rec: Recording, spec: Spec, rows: np.ndarray) -> np.ndarray:
    """(K, D) trials columns as behaviour, NaN where the outlier column is not 0 (nlb_tools'
    behavior_mask)."""
    need_columns(rec, spec.trial_behaviour + (spec.outlier,))
    out = np.stack([rec.trials[c][rows].astype(np.float64) for c in spec.trial_behaviour], -1)
    out[rec.trials[spec.outlier][rows].astype(np.float64) != 0] = np.nan
    return out


def set_go_bins(rec: Recording, spec: Spec, w: Windows, bin_ms: int) -> tuple:
    """((K,) first bin at or after scored_from, (K,) last bin that starts before the event):
    nlb_tools slices its time index from the start to the event less 1 us."""
    need_columns(rec, (spec.scored_from,))
    start = rec.trials[spec.scored_from][w.rows].astype(np.float64)
    if not np.isfinite(start).all():
        raise DataError(f"{rec.path}: trial rows {w.rows[~np.isfinite(start)][:5].tolist()} "
                        f"have no {spec.scored_from}")
    step = bin_ms * 10**6
    last = (w.align_ns.astype(np.int64) - 1000) // step
    return first_bins(start, 0, bin_ms), last


def scored_spikes(rec: Recording, spec: Spec, units: np.ndarray, w: Windows, n_bins: int,
                  bin_ms: int) -> np.ndarray:
    """(K, T, N) held-out spikes of the bins from scored_from to the event, NaN elsewhere.
    nlb_tools (make_jagged_array, pad 'front', seg_len the window) puts a trial's last bin
    before the event `jitter` bins before the array's end, which lines it up with the shifted
    input window, and keeps at most T - jitter bins."""
    s0, last = set_go_bins(rec, spec, w, bin_ms)
    c = counts(rec, units, last - n_bins + 1, n_bins, bin_ms).astype(np.float64)  # (K, T, N)
    q = np.arange(n_bins)
    c[(last[:, None] - n_bins + 1 + q) < s0[:, None]] = np.nan  # bins before the start
    src = q + w.jitter[:, None]  # (K, T) the bin of c that lands at each position
    out = np.full(c.shape, np.nan)
    ok = src < n_bins
    out[ok] = c[np.nonzero(ok)[0], src[ok]]
    return out


def psth_set_go(rec: Recording, spec: Spec, units, train: Windows, evals: Windows,
                n_bins: int, bin_ms: int) -> dict:
    """NLB's PSTHs (C, T, N) for trials of varying length (nlb_tools' _make_psth with pad
    'front'): per condition its trials that are not outliers (outlier column 1), from
    scored_from to the event, smoothed as above; trials shorter than 0.8 x the condition's
    mean length dropped; the mean of the bins that share a time from the event (rounded up to
    the grid), the last min_len of them, NaN in front up to T. Also each condition's kept
    trials and, to undo the shift of the input windows, the jitter in bins."""
    w = Windows(*(np.r_[getattr(train, k), getattr(evals, k)]
                  for k in ("rows", "align_ns", "k0", "jitter")))
    s0, last = set_go_bins(rec, spec, w, bin_ms)
    length = last - s0 + 1  # (K,)
    combos, cond = conditions(rec, spec, w.rows)
    cond[rec.trials[spec.outlier][w.rows].astype(np.float64) == 1] = -1
    sm = smoothed_bins(rec, units, last - n_bins + 1, n_bins, bin_ms, spec.psth_sd_ms)
    step = bin_ms * 10**6
    event_bin = -((-w.align_ns.astype(np.int64)) // step)  # (K,) the event rounded up
    rel = (last - event_bin - n_bins + 1)[:, None] + np.arange(n_bins)  # (K, T) from it
    psths, kept = [], []
    for c in range(len(combos)):
        k = np.flatnonzero(cond == c)
        if not len(k):
            continue  # a condition of outliers alone
        k = k[length[k] >= 0.8 * length[k].mean()]
        n = length[k].min()
        if n > n_bins:
            raise DataError(f"{rec.path}: {spec.scored_from} to {spec.align} spans {n} bins in "
                            f"condition {combos[c]}, more than the window's {n_bins}")
        valid = (last[k, None] - n_bins + 1 + np.arange(n_bins)) >= s0[k, None]  # (k, T)
        times = np.unique(rel[k][valid])[-n:]
        psth = np.full((n_bins, len(units)), np.nan)
        psth[n_bins - n:] = [sm[k][valid & (rel[k] == t)].mean(axis=0) for t in times]
        psths.append(psth)
        kept.append(k)
    n_tr = len(train.rows)
    return {"psth": np.stack(psths),
            "train_cond_idx": [k[k < n_tr] for k in kept],
            "eval_cond_idx": [k[k >= n_tr] - n_tr for k in kept],
            "train_jitter": train.jitter, "eval_jitter": evals.jitter}


# ---------------------------------------------------------------------------------------------
# prepare: the session file and, in the val phase, the target file


@dataclass
class Prepared:
    """What one dataset and phase hold, binned."""
    rec: Recording  # the train file
    train: Windows  # NLB's training trials
    evals: Windows  # the scored trials (of the test file in the test phase)
    units: tuple  # (held-in rows, held-out rows) of the train file's units table
    counts: np.ndarray  # (K, T + F, N) the training trials, held-in units first
    eval_heldin: np.ndarray  # (K_e, T, N_in) the scored trials' held-in spikes
    behaviour: np.ndarray  # (K, T, D) the training trials' behaviour, lagged; (K, D) per trial
    grid: np.ndarray | None  # (S_bins, D) the behaviour at the bins' grid (None: per trial)
    n_bins: int  # T
    n_fp: int  # F


def bin_phase(folder: str, spec: Spec, phase: str, bin_ms: int, notes: list) -> Prepared:
    train_path, test_path = find_files(folder, spec)
    n_bins = (spec.window_ms[1] - spec.window_ms[0]) // bin_ms
    n_fp = spec.fp_ms // bin_ms
    rec = read_recording(train_path, spec, with_behaviour=bool(spec.behaviour))
    train = windows(rec, spec, ("train",) if phase == "val" else ("train", "val"),
                    n_bins + n_fp, bin_ms, notes)
    check_no_cut(rec, spec, train, n_bins, bin_ms, spec.overlap[0])
    units = unit_order(rec)
    if phase == "val":
        ev_rec, ev_units = rec, units[0]
        evals = windows(rec, spec, ("val",), n_bins + n_fp, bin_ms, notes)
    else:  # the test file: held-in spikes of the encoder window alone
        ev_rec = read_recording(test_path, spec, with_behaviour=False)
        ev_units = matching_units(ev_rec, rec.ids[units[0]])
        evals = windows(ev_rec, spec, ("test",), n_bins, bin_ms, notes)
    check_no_cut(ev_rec, spec, evals, n_bins, bin_ms, spec.overlap[1])
    if spec.behaviour:
        grid = resample(rec.behaviour, bin_ms)
        beh = behaviour_bins(rec, spec, train, n_bins, bin_ms, spec.overlap[1], grid)
    else:
        grid, beh = None, trial_behaviour(rec, spec, train.rows)
    return Prepared(rec, train, evals, units,
                    counts(rec, np.r_[units], train.k0, n_bins + n_fp, bin_ms),
                    counts(ev_rec, ev_units, evals.k0, n_bins, bin_ms), beh, grid, n_bins, n_fp)


def matching_units(rec: Recording, ids: np.ndarray) -> np.ndarray:
    """Rows of the test file's held-in units in the order of the train file's ids `ids`."""
    rows = np.flatnonzero(~rec.heldout)
    have = dict(zip(rec.ids[rows].tolist(), rows.tolist()))
    missing = [i for i in ids.tolist() if i not in have]
    if missing or len(have) != len(ids):
        raise DataError(f"{rec.path}: its held-in units (ids {sorted(have)[:8]}...) are not the "
                        f"train file's ({ids[:8].tolist()}...): files of two datasets?")
    return np.array([have[i] for i in ids.tolist()])


def prepare(folder: str, dataset: str, phase: str, bin_ms: int, out_dir: str,
            valid_frac: float = 0.2, seed: int = 0) -> tuple:
    """Bin a downloaded dandiset and write <out-dir>/<name>_<phase>.h5 (and, in the val
    phase, <name>_<phase>_target.h5); return their paths (target None in the test phase)."""
    if dataset not in DATASETS:
        raise DataError(f"--dataset {dataset}: one of {', '.join(DATASETS)}")
    if phase not in ("val", "test") or bin_ms not in (5, 20):
        raise DataError(f"--phase {phase} --bin-ms {bin_ms}: the phase is val or test, the "
                        "bins 5 or 20 ms (NLB's two)")
    spec, notes = DATASETS[dataset], []
    p = bin_phase(folder, spec, phase, bin_ms, notes)
    stem = os.path.join(out_dir, f"{group_name(dataset, bin_ms)}_{phase}")
    os.makedirs(out_dir, exist_ok=True)
    target = None
    if phase == "val":
        target = stem + "_target.h5"
        write_target(target, group_name(dataset, bin_ms), target_tensors(p, spec, bin_ms))
    write_nlb_session(stem + ".h5", p, spec, dataset, phase, bin_ms, valid_frac, seed,
                      target, notes)
    return stem + ".h5", target


def write_nlb_session(path: str, p: Prepared, spec: Spec, dataset: str, phase: str,
                      bin_ms: int, valid_frac: float, seed: int, target, notes: list) -> None:
    """The session file (src/prep_nwb.py's writer): our train/valid split drawn inside NLB's
    training trials, the scored trials' held-in spikes as test_encod_data."""
    from types import SimpleNamespace

    train, valid = split_trials(len(p.train.rows), valid_frac, np.random.default_rng(seed))
    beh = None  # behaviour per trial (DMFC_RSG) stays in the trials group and the target
    if p.behaviour.ndim == 3:
        pad = np.full(p.behaviour.shape[:1] + (p.n_fp, p.behaviour.shape[2]), np.nan)
        beh = (np.concatenate([p.behaviour, pad], axis=1).astype(np.float32),
               p.rec.behaviour_names, p.rec.behaviour_units)
    n_in = len(p.units[0])
    extra = {"test_encod_data": p.eval_heldin.astype(smallest_uint(p.eval_heldin)),
             "unit_ids": p.rec.ids[np.r_[p.units]],
             "trials": {c: v.astype(np.float64) for c, v in p.rec.trials.items()
                        if v.dtype.kind in "biuf"},
             "nlb_train_rows": p.train.rows, "nlb_eval_rows": p.evals.rows}
    if spec.jitter_ms:  # where each window starts: the event's bin, shifted by these bins
        extra.update(nlb_train_jitter=p.train.jitter, nlb_test_jitter=p.evals.jitter)
    kern_sd, alpha = spec.smoothing
    attrs = {"bin_size": bin_ms / 1000, "fp_bins": p.n_fp, "nlb_dataset": dataset,
             "nlb_phase": phase, "nlb_bin_ms": bin_ms, "nlb_target": os.path.basename(target)
             if target else "", "n_heldin": n_in, "n_heldout": len(p.units[1]),
             "smoothing_kern_sd": kern_sd / 1000, "smoothing_alpha": alpha,
             "align_event": spec.align, "window": np.array(spec.window_ms) / 1000,
             "t_before": -spec.window_ms[0] / 1000, "t_after": spec.window_ms[1] / 1000,
             "source": os.path.abspath(p.rec.path), "notes": json.dumps(notes),
             "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_session(path, p.counts, beh, p.train.rows, {"train": train, "valid": valid},
                  SimpleNamespace(fp_bins=p.n_fp), n_in, extra, attrs)


def target_tensors(p: Prepared, spec: Spec, bin_ms: int) -> dict:
    """What NLB scores the val phase against (nlb_tools' make_eval_target_tensors)."""
    rec, ev, t, f = p.rec, p.evals, p.n_bins, p.n_fp
    heldin, heldout = p.units
    out = {"eval_spikes_heldout": scored_spikes(rec, spec, heldout, ev, t, bin_ms)
           if spec.scored_from else counts(rec, heldout, ev.k0, t, bin_ms),
           "train_behavior": p.behaviour,
           "eval_behavior": trial_behaviour(rec, spec, ev.rows) if p.grid is None else
           behaviour_bins(rec, spec, ev, t, bin_ms, spec.overlap[1], p.grid),
           "eval_spikes_heldin_forward": counts(rec, heldin, ev.k0 + t, f, bin_ms),
           "eval_spikes_heldout_forward": counts(rec, heldout, ev.k0 + t, f, bin_ms)}
    if spec.decode_mask:  # one decoder per value of the column
        for name, w in (("train", p.train), ("eval", ev)):
            v = rec.trials[spec.decode_mask][w.rows]
            out[f"{name}_decode_mask"] = np.stack([v == 0, v == 1]).T
    if spec.psth_conds:
        psth = psth_set_go if spec.scored_from else psth_target
        out.update(psth(rec, spec, np.r_[heldin, heldout], p.train, ev, t, bin_ms))
    return out


def write_target(path: str, group: str, tensors: dict) -> None:
    """NLB's target layout: one group; floats as float32, condition indices as ragged ints,
    jitter as ints (NLB's evaluation slices with it)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        g = f.create_group(group)
        for key, v in tensors.items():
            if isinstance(v, list):
                d = g.create_dataset(key, (len(v),), dtype=h5py.vlen_dtype(np.int64))
                for i, idx in enumerate(v):
                    d[i] = idx
            else:
                v = np.asarray(v)
                keep = v.dtype == bool or key.endswith("_jitter")
                g.create_dataset(key, data=v if keep else v.astype(np.float32),
                                 compression="gzip")


# ---------------------------------------------------------------------------------------------
# NLB's scores (nlb_tools' evaluation, retyped)


def velocity_r2(train_rates, train_beh, train_masks, eval_rates, eval_beh, eval_masks) -> float:
    """Ridge from the rates of a bin to the (lagged) behaviour of that bin, its penalty chosen
    by 5-fold CV among NLB's grid on the training trials; R2 (mean over dimensions) on the
    scored trials; bins without behaviour left out. One decoder per mask column, R2 averaged."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV

    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    r2s = []
    for i in range(train_masks.shape[1]):
        x, y = flat(train_rates[train_masks[:, i]]), flat(train_beh[train_masks[:, i]])
        xe, ye = flat(eval_rates[eval_masks[:, i]]), flat(eval_beh[eval_masks[:, i]])
        ok, oke = ~np.isnan(y[:, 0]), ~np.isnan(ye[:, 0])
        gs = GridSearchCV(Ridge(), {"alpha": RIDGE_ALPHAS}).fit(x[ok], y[ok])
        r2s.append(gs.score(xe[oke], ye[oke]))
    return float(np.mean(r2s))


def shift_later(rates: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    """(K, T, N) each trial's rates moved `jitter` bins later (earlier if negative), NaN where
    nothing lands: undoes the shift of DMFC_RSG's input windows (nlb_tools' eval_psth)."""
    out = np.full(rates.shape, np.nan)
    t = rates.shape[1]
    for i, j in enumerate(np.asarray(jitter, np.int64).tolist()):
        if j >= 0:
            out[i, j:] = rates[i, :t - j]
        else:
            out[i, :t + j] = rates[i, -j:]
    return out


def psth_r2(psth, eval_rates, cond_idx, jitter=None) -> float:
    """R2 (mean over neurons) of the condition means of the scored trials' rates against NLB's
    PSTHs over the PSTHs' bins that are not NaN, all conditions' bins stacked."""
    from sklearn.metrics import r2_score

    if jitter is not None:
        eval_rates = shift_later(eval_rates, jitter)
    true, pred = [], []
    for c, idx in enumerate(cond_idx):
        if len(idx):
            keep = ~np.isnan(psth[c, :, 0])
            true.append(psth[c][keep])
            pred.append(eval_rates[np.asarray(idx)].mean(axis=0)[keep])
            if np.isnan(pred[-1]).any():
                raise DataError("the PSTH of a condition reaches bins its trials' shifted "
                                "windows do not cover")
    return float(r2_score(np.vstack(true), np.vstack(pred)))


def tp_corr(scored: np.ndarray, rates: np.ndarray, behaviour: np.ndarray) -> float:
    """NLB's tp corr (nlb_tools' speed_tp_correlation): per trial the neural speed, the mean
    step ||r(t+1) - r(t)|| of all units' rates over the scored bins (set to go); Pearson's r
    of it with tp (the last column) within each condition of the first three columns (is_eye,
    theta, is_short; outliers' rows are NaN and left out), averaged over conditions.
    scored: (K, T) bool; rates: (K, T, N); behaviour: (K, D)."""
    speed = np.array([np.linalg.norm(np.diff(r[m], axis=0), axis=1).mean()
                      for r, m in zip(rates, scored)])  # (K,)
    cond = behaviour[:, :3]
    rs = []
    for c in np.unique(cond[~np.isnan(cond).all(axis=1)], axis=0):
        m = (cond == c).all(axis=1)
        x, y = speed[m] - speed[m].mean(), behaviour[m, -1] - behaviour[m, -1].mean()
        with np.errstate(invalid="ignore", divide="ignore"):
            rs.append(np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y)))
    return float(np.mean(rs))


def evaluate(target: dict, sub: dict) -> dict:
    """co-bps, vel R2 (tp corr where the behaviour is one row per trial: DMFC_RSG), PSTH R2
    (where the target has PSTHs) and fp-bps of a submission group against a target group, as
    nlb_tools' evaluate scores them."""
    from src.metrics import bits_per_spike

    cat = lambda a, b: np.concatenate([a, b], axis=-1).astype(np.float64)  # noqa: E731
    ev = cat(sub["eval_rates_heldin"], sub["eval_rates_heldout"])  # (K_e, T, N)
    spikes = np.asarray(target["eval_spikes_heldout"], np.float64)
    # NLB leaves NaN target bins out of co-bps, the null model's means included: DMFC_RSG's
    # bins outside set to go (whole bins, all units)
    scored = ~np.isnan(spikes[..., 0])  # (K_e, T)
    out = {"co_bps": float(bits_per_spike(
        np.asarray(sub["eval_rates_heldout"], np.float64)[scored][None], spikes[scored][None]))}
    if np.ndim(target["eval_behavior"]) == 2:
        out["tp_corr"] = tp_corr(scored, ev, target["eval_behavior"])
    else:
        tr = cat(sub["train_rates_heldin"], sub["train_rates_heldout"])
        every = lambda a: np.ones((len(a), 1), bool)  # noqa: E731
        masks = (target["train_decode_mask"], target["eval_decode_mask"]) if (
            "train_decode_mask" in target) else (every(tr), every(ev))
        out["vel_r2"] = velocity_r2(tr, target["train_behavior"], masks[0], ev,
                                    target["eval_behavior"], masks[1])
    if "psth" in target:
        psth = np.asarray(target["psth"], np.float64)  # (C, T, N), as NLB reads it
        out["psth_r2"] = psth_r2(psth, ev, target["eval_cond_idx"], target.get("eval_jitter"))
    out["fp_bps"] = float(bits_per_spike(
        cat(sub["eval_rates_heldin_forward"], sub["eval_rates_heldout_forward"]),
        cat(target["eval_spikes_heldin_forward"], target["eval_spikes_heldout_forward"])))
    return out


def read_group(path: str, group: str) -> dict:
    with h5py.File(path, "r") as f:
        if group not in f:
            raise DataError(f"{path}: no group '{group}' (it has: {', '.join(f)})")
        return {k: (list(v[()]) if v.dtype.kind == "O" else v[()]) for k, v in f[group].items()}


# ---------------------------------------------------------------------------------------------
# submit: a run's rates in NLB's submission layout


def read_session(path: str) -> dict:
    """The NLB keys of a session file written by `prepare`."""
    with h5py.File(path, "r") as f:
        if "nlb_dataset" not in f.attrs:
            raise DataError(f"{path}: not a session file of `python -m src.nlb prepare`")
        out = {k: f.attrs[k] for k in ("nlb_dataset", "nlb_phase", "nlb_bin_ms", "nlb_target",
                                       "n_heldin", "fp_bins")}
        for k in ("train_inds", "valid_inds", "nlb_train_rows", "nlb_eval_rows"):
            out[k] = f[k][()]
    return out


def rate_groups(run_dir: str) -> tuple:
    """(session file, its NLB keys, submission group {key: float32 array}) of a run folder."""
    from src.runs import run_outputs

    pairs = run_outputs(run_dir)
    if len(pairs) != 1:
        raise DataError(f"{run_dir}: a stitched run; submit a run of one NLB session")
    session, output = pairs[0]
    s = read_session(session)
    with h5py.File(os.path.join(run_dir, output), "r") as f:
        rates = {k: f[f"{k}_rates"][()] for k in ("train", "valid", "test") if f"{k}_rates" in f}
    if "test" not in rates:
        raise DataError(f"{run_dir}/{output}: no test_rates: the scored trials' rates")
    # NLB's training trials in the trials table's order, whatever our own split
    rows = np.r_[s["train_inds"], s["valid_inds"]]
    order = np.argsort(rows, kind="stable")
    if not np.array_equal(rows[order], s["nlb_train_rows"]):
        raise DataError(f"{session}: train_inds and valid_inds are not NLB's training trials")
    train = np.concatenate([rates["train"], rates["valid"]])[order]  # (K, T + F, N)
    n_in, t = int(s["n_heldin"]), train.shape[1] - int(s["fp_bins"])
    ev = rates["test"]
    group = {"train_rates_heldin": train[:, :t, :n_in], "train_rates_heldout": train[:, :t, n_in:],
             "eval_rates_heldin": ev[:, :t, :n_in], "eval_rates_heldout": ev[:, :t, n_in:],
             "eval_rates_heldin_forward": ev[:, t:, :n_in],
             "eval_rates_heldout_forward": ev[:, t:, n_in:]}
    return session, s, {k: v.astype(np.float32) for k, v in group.items()}


def write_submission(path: str, name: str, group: dict) -> None:
    """Add (or replace) one dataset's group in the submission file, atomically: several
    datasets share one file, as EvalAI takes them."""
    import shutil

    with atomic_path(path) as tmp:
        if os.path.isfile(path):
            shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a") as f:
            if name in f:
                del f[name]
            g = f.create_group(name)
            for key in RATE_KEYS:
                g.create_dataset(key, data=group[key], compression="gzip")


def submit(run_dir: str, out: str) -> dict | None:
    """Write the run's group into `out`; in the val phase score it, write
    RUN_DIR/nlb_scores.json and return the scores."""
    from src.utils import atomic_write_text

    session, s, group = rate_groups(run_dir)
    name = group_name(str(s["nlb_dataset"]), int(s["nlb_bin_ms"]))
    write_submission(out, name, group)
    if str(s["nlb_phase"]) != "val":
        return None
    target = read_group(os.path.join(os.path.dirname(session), str(s["nlb_target"])), name)
    scores = evaluate(target, group)
    atomic_write_text(os.path.join(run_dir, "nlb_scores.json"),
                      json.dumps({"dataset": name, **scores}, indent=2) + "\n")
    return scores


# ---------------------------------------------------------------------------------------------
# the command


def build_parser():
    p = FlagParser(prog="python -m src.nlb", description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{prepare,submit}")
    a = sub.add_parser("prepare", help="a downloaded dandiset -> a session file",
                       formatter_class=HelpFormatter)
    a.add_argument("folder", metavar="DANDI_FOLDER", help="the dandiset's folder")
    a.add_argument("--dataset", required=True, choices=list(DATASETS), metavar="NAME",
                   help=f"one of {', '.join(DATASETS)}")
    a.add_argument("--phase", default="val", choices=("val", "test"), help="val: score "
                   "yourself on the val trials; test: train on train and val, submit the test "
                   "trials (default: %(default)s)")
    a.add_argument("--bin-ms", type=int, default=5, choices=(5, 20), help="bin width in ms "
                   "(default: %(default)s)")
    a.add_argument("--out-dir", default="data/nlb", metavar="DIR",
                   help="folder of the session file (default: %(default)s)")
    a.add_argument("--valid-frac", type=float, default=0.2, metavar="F", help="share of NLB's "
                   "training trials in our own validation split (default: %(default)s)")
    a.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of that split (default: %(default)s)")
    b = sub.add_parser("submit", help="a run's rates -> NLB's submission file",
                       formatter_class=HelpFormatter)
    b.add_argument("run_dir", metavar="RUN_DIR", help="a run folder of src.main")
    b.add_argument("--out", default="submission.h5", metavar="FILE", help="the submission "
                   "file; a group of another dataset already there is kept (default: "
                   "%(default)s)")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.command == "prepare":
            session, target = prepare(a.folder, a.dataset, a.phase, a.bin_ms, a.out_dir,
                                      a.valid_frac, a.seed)
            print(f"wrote {session}" + (f" and {target}" if target else ""))
        else:
            scores = submit(a.run_dir, a.out)
            print(f"wrote {a.out}")
            if scores is not None:
                print("NLB's scores on the val trials: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in scores.items()))
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
