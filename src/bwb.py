"""IBL's BrainWideBench (BWB), task suite 2 co-smoothing: from a released session file to the
prediction files its leaderboard scores, and the local score.

    python -m src.bwb prepare DATA_ROOT --eid EID               # -> data/bwb_<EID>.h5
    python -m src.main --data data/bwb_<EID>.h5 --seed 43       # trains as any session
    python -m src.bwb predict results/<run> --label my-lfads --out predictions
    python -m src.bwb score predictions/my-lfads --data-dir data
    python -m src.bwb check predictions/my-lfads --data-dir data
    python -m src.bwb baseline data/bwb_<EID>.h5 --kind ridge --label ridge --out predictions
    python -m src.bwb synth DATA_ROOT --eid EID                 # a synthetic session, BWB layout

BWB's rules, retyped from their sources (each cited where it is used): the benchmark's
repository (brainbench-org/ibl-bwb: src/ts2/ts2_dataset.py, src/ts2/ts2_test_mixin.py, the
ibl_brain_wide_bench_2026 pipeline), torch-brain 0.2.0a0 (the window sampler, bin_spikes, the
lazy slice of an HDF5 time series), ibl-bwb-eval 0.1.0 (the prediction file, the metrics) and
the leaderboard's validator (int-brain-lab/app-brain-wide-bench). docs/bwb.md explains them.

Legend: W windows, T = 50 bins of 20 ms, N units, N_in held-in units, K held-out units.
"""

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from src.binning import smallest_uint
from src.data import DataError
from src.utils import FlagParser, HelpFormatter, atomic_path

BIN_SIZE = 0.02  # seconds (IBLBrainWideBenchTS2.BIN_SIZE)
WINDOW = 1.0  # seconds scored per window (ibl_bwb_eval.tasks.ts2.COSMOOTH_TARGET_WINDOW)
T_BINS = 50  # round(WINDOW / BIN_SIZE)
BIN_EPS = 1e-3  # torch_brain.utils.binning.bin_spikes' tolerance when counting whole bins
LOG_EPS = 1e-6  # the floor of a rate before its log (BWB's statistical baselines)
HELD_OUT_RATIO = 0.1  # pipeline.py TS2_CO_SMOOTHING_HELD_OUT_RATIO
TEST_SALT = "ts2_co_smoothing_test"  # pipeline.py: rewording it would reassign the units
VAL_SALT = "ts2_co_smoothing_val"
CHUNK_S = 300.0  # pipeline.py SPLIT_CHUNK_DURATION_SEC: 5 min chunks
SPLIT_GAP_S = 20.0  # pipeline.py MIN_SPLIT_GAP_SEC
DIRNAME = "ibl_brain_wide_bench_2026"
TASK = "ts2-co_smoothing"  # ibl_bwb_eval.tasks.task_id("ts2", "co_smoothing")
EVAL_SEEDS = (43, 44, 45, 46, 47)  # ibl_bwb_eval.protocol.EVAL_SEEDS; at least 3, contiguous
WRITER_VERSION = "0.1.0"  # the ibl_bwb_eval version our own writer stamps into a file


# -----------------------------------------------------------------------------
# BWB's rules


def held_out_mask(unit_ids, salt: str = TEST_SALT, ratio: float = HELD_OUT_RATIO) -> np.ndarray:
    """(N,) bool: the k = max(1, round(ratio N)) units ranking first by sha256("salt:uuid")
    hex digest (pipeline.py co_smoothing_held_out_mask; Python's round, half to even)."""
    k = max(1, round(ratio * len(unit_ids)))
    digests = [hashlib.sha256(f"{salt}:{u}".encode()).hexdigest() for u in unit_ids]
    order = sorted(range(len(unit_ids)), key=lambda i: digests[i])
    mask = np.zeros(len(unit_ids), dtype=bool)
    mask[order[:k]] = True
    return mask


def intersect(a: tuple, b: tuple) -> tuple:
    """Intersection of two sorted, disjoint interval lists (starts, ends), as torch-brain's
    Interval.__and__ keeps it: for each interval of b in order, the overlapping ones of a,
    clipped, kept when of positive length (a point survives only when one side is a point)."""
    (a0, a1), (b0, b1) = (np.asarray(x, np.float64) for x in a), (np.asarray(x, np.float64)
                                                                   for x in b)
    starts, ends = [], []
    for s_b, e_b in zip(b0, b1):
        lo, hi = np.searchsorted(a1, s_b, side="left"), np.searchsorted(a0, e_b, side="right")
        if lo >= hi:
            continue
        s, e = a0[lo:hi].copy(), a1[lo:hi].copy()
        s[0], e[-1] = max(s[0], s_b), min(e[-1], e_b)
        keep = (s < e) | ((s == e) & ((a0[lo:hi] == a1[lo:hi]) | (s_b == e_b)))
        starts.append(s[keep])
        ends.append(e[keep])
    if not starts:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(starts), np.concatenate(ends)


def window_starts(start: float, end: float, step: float) -> tuple:
    """(starts, ends) float64 of one interval's windows, as torch-brain's
    SequentialFixedWindowSampler makes them: t from torch.arange(start, end, step) in float64,
    kept while t + WINDOW <= end, window (t, t + WINDOW); then a last window (end - WINDOW,
    end) flush with the interval's end when the previous one stops short of it."""
    t = torch.arange(start, end, step, dtype=torch.float64)
    t = t[t + WINDOW <= end].numpy()
    stop = t + WINDOW
    if len(t) == 0 or stop[-1] < end:
        t, stop = np.append(t, end - WINDOW), np.append(stop, end)
    return t, stop


def split_windows(intervals: tuple, step: float, skip_short: bool = False) -> tuple:
    """(starts, ends) float64 (W,) over every interval in order. An interval shorter than a
    window stops BWB's sampler (an error here too), or is skipped with skip_short."""
    starts, ends = [np.zeros(0)], [np.zeros(0)]
    for s, e in zip(*intervals):
        if e - s < WINDOW:
            if skip_short:
                continue
            raise DataError(f"interval ({s!r}, {e!r}) is shorter than a {WINDOW:g} s window")
        t, stop = window_starts(float(s), float(e), step)
        starts.append(t)
        ends.append(stop)
    return np.concatenate(starts), np.concatenate(ends)


def window_geometry(starts, ends, domain: tuple) -> tuple:
    """Per window, what torch-brain does before counting (BWB's _get_target on a lazily loaded
    recording): the slice's domain [d0, d1] (relative to the window start); bin_spikes drops
    the part of a bin it cannot fill from the left ('discard'), which slices the still
    unresolved spikes a second time, so spikes are kept in [lo, hi) of absolute time and
    shifted by (shift1, then shift2). Returns (lo, hi, shift1, shift2, n_bins), each (W,)."""
    s, e = np.asarray(starts, np.float64), np.asarray(ends, np.float64)
    d0, d1 = np.maximum(domain[0], s) - s, np.minimum(domain[1], e) - s
    discard = (d1 - d0) - np.floor((d1 - d0) / BIN_SIZE + BIN_EPS) * BIN_SIZE
    cut = discard > 0
    first = np.where(cut, d0 + discard, d0)  # bin_spikes' new start
    twice = s + first  # the second blind slice: bounds and origin both move by it
    lo = np.where(cut, twice, s)
    hi = np.where(cut, np.minimum(d1 + s, e), e)
    shift1, shift2 = np.where(cut, twice, s), np.where(cut, 0.0, d0)
    n_bins = np.round((d1 - first) / BIN_SIZE).astype(np.int64)
    return lo, hi, shift1, shift2, n_bins


def bin_windows(times, units, n_units: int, starts, ends, domain: tuple,
                chunk: int = 512) -> np.ndarray:
    """Spike counts (W, T, N) of windows [start, end), bit for bit as BWB's target: torch-brain's
    bin_spikes on the lazily sliced recording (see window_geometry); bin = floor(t * (1 / 0.02)).
    Memory stays flat: a chunk of windows at a time, spikes found by binary search."""
    lo, hi, sh1, sh2, n_bins = window_geometry(starts, ends, domain)
    if np.any(n_bins != T_BINS):
        w = int(np.flatnonzero(n_bins != T_BINS)[0])
        raise DataError(f"window at {starts[w]!r} s has {n_bins[w]} bins, not {T_BINS}")
    i_lo, i_hi = np.searchsorted(times, lo), np.searchsorted(times, hi)
    out = np.zeros((len(lo), T_BINS, n_units), dtype=np.uint8)
    rate = 1 / BIN_SIZE  # as bin_spikes computes it
    for w0 in range(0, len(lo), chunk):
        sl = slice(w0, w0 + chunk)
        n = i_hi[sl] - i_lo[sl]  # (w,) spikes per window
        win = np.repeat(np.arange(len(n)), n)  # (spikes,) window of each spike
        idx = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + np.repeat(i_lo[sl], n)
        b = np.floor(((times[idx] - sh1[sl][win]) - sh2[sl][win]) * rate).astype(np.int64)
        if np.any(b >= T_BINS) or np.any(b < 0):
            raise DataError(f"a spike falls outside its window's {T_BINS} bins near "
                            f"{starts[w0]!r} s")
        flat = (win * T_BINS + b) * n_units + units[idx]
        c = np.bincount(flat, minlength=len(n) * T_BINS * n_units)
        out[sl] = np.minimum(c, 255).reshape(len(n), T_BINS, n_units)
    return out


# -----------------------------------------------------------------------------
# a BWB session file (torch-brain's Data.to_hdf5 layout), read with h5py


@dataclass
class BWBSession:
    path: str
    eid: str  # /session attribute id: the recording id
    times: np.ndarray  # (spikes,) float64 seconds, sorted
    units: np.ndarray  # (spikes,) int64 row of the unit table
    domain: tuple  # (start, end) of the spikes' domain
    unit_ids: list  # (N,) uuids in the unit table's order
    held_out: np.ndarray  # (N,) bool: ts2_co_smoothing_is_held_out_test
    intervals: dict  # split -> (starts, ends): task-aligned intervals of that split
    meta: dict  # dataset_version, unit_filtering of the build


def _need(f, path: str, key: str):
    if key not in f:
        raise DataError(f"{path}: missing '{key}': not a BrainWideBench session file (a "
                        f"torch-brain HDF5 with spikes, units and ts2 split domains)")
    return f[key]


def _interval(f, path: str, key: str) -> tuple:
    """(starts, ends) float64 of a torch-brain Interval group."""
    _need(f, path, f"{key}/start"), _need(f, path, f"{key}/end")
    return f[key]["start"][()].astype(np.float64), f[key]["end"][()].astype(np.float64)


def _meta(f, path: str) -> dict:
    b = _need(f, path, "brainset").attrs
    meta = {k: str(b[k]) for k in ("derived_version", "unit_filtering") if k in b}
    if meta.get("unit_filtering") != "selected_units":
        raise DataError(f"{path}: brainset unit_filtering is {meta.get('unit_filtering')!r}; "
                        "TS2 needs the 'selected_units' build (the eval files)")
    return {"dataset_version": meta.get("derived_version", "unknown"),
            "unit_filtering": meta["unit_filtering"]}


def read_bwb(path: str) -> BWBSession:
    """One session file of BWB's eval set, with clear errors for anything else."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file: {e}") from e
    with f:
        eid = str(_need(f, path, "session").attrs.get("id", ""))
        times = _need(f, path, "spikes/timestamps")[()].astype(np.float64)
        units = _need(f, path, "spikes/unit_index")[()].astype(np.int64)
        dom = _interval(f, path, "spikes/domain")
        ids = [u.decode() if isinstance(u, bytes) else str(u) for u in _need(f, path, "units/id")]
        attr = "units/ts2_co_smoothing_is_held_out_test"
        held = _need(f, path, attr)[()].astype(bool)
        tai = _interval(f, path, "task_aligned_intervals/domain")
        splits = {s: intersect(tai, _interval(f, path, f"ts2_{s}_domain"))
                  for s in ("train", "val", "test")}
        meta = _meta(f, path)
    _check(path, eid, times, units, ids, held)
    return BWBSession(path, eid, times, units, (float(dom[0][0]), float(dom[1][-1])), ids,
                      held, splits, meta)


def _check(path, eid, times, units, ids, held) -> None:
    if not eid:
        raise DataError(f"{path}: the session group has no 'id' (the recording id)")
    if len(held) != len(ids):
        raise DataError(f"{path}: {len(held)} held-out flags for {len(ids)} units")
    if np.any(np.diff(times) < 0):
        raise DataError(f"{path}: 'spikes/timestamps' is not sorted")
    if len(units) != len(times) or units.min(initial=0) < 0 or units.max(initial=0) >= len(ids):
        raise DataError(f"{path}: 'spikes/unit_index' does not index the {len(ids)} units")
    if not np.array_equal(held, held_out_mask(ids)):
        raise DataError(f"{path}: its held-out units differ from BWB's sha256 rule "
                        f"('{TEST_SALT}:' + uuid); a build of another benchmark version?")


# -----------------------------------------------------------------------------
# prepare: a BWB session -> our session file


@dataclass
class PrepareConfig:
    eid: str = ""  # the recording id: reads DATA_ROOT/ibl_brain_wide_bench_2026/eval/<eid>.h5
    out_dir: str = "data"  # folder of the session file <out-dir>/bwb_<eid>.h5
    stride_bins: int = 5  # bins between the starts of training (and validation) windows


def session_path(root: str, eid: str) -> str:
    path = os.path.join(root, DIRNAME, "eval", f"{eid}.h5")
    if not os.path.isfile(path):
        have = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(
            root, DIRNAME, "eval", "*.h5")))
        raise DataError(f"--eid {eid}: no file {path} (DATA_ROOT is the folder holding "
                        f"{DIRNAME}/eval/); there: {', '.join(have[:5]) or 'nothing'}")
    return path


def split_counts(s: BWBSession, split: str, step: float) -> tuple:
    """(counts (W, T, N) with held-out columns last, starts (W,), ends (W,)) of a split; the
    training and validation splits skip intervals shorter than a window, the test one cannot."""
    starts, ends = split_windows(s.intervals[split], step, skip_short=split != "test")
    if len(starts) == 0:
        raise DataError(f"{s.path}: the {split} split has no task-aligned interval")
    counts = bin_windows(s.times, s.units, len(s.unit_ids), starts, ends, s.domain)
    order = np.concatenate([np.flatnonzero(~s.held_out), np.flatnonzero(s.held_out)])
    return counts[:, :, order], starts, ends


def prepare(root: str, cfg: PrepareConfig) -> str:
    """Write <out-dir>/bwb_<eid>.h5: train and valid windows (every unit reconstructed, held-in
    encoded), the test windows at BWB's starts, their held-out targets and the unit ids."""
    if not cfg.eid:
        raise DataError("--eid: the recording id of the session to prepare is required")
    s = read_bwb(session_path(root, cfg.eid))
    n_in = int((~s.held_out).sum())
    data = {}
    for split, ours in (("train", "train"), ("val", "valid")):
        counts, starts, _ = split_counts(s, split, cfg.stride_bins * BIN_SIZE)
        data[f"{ours}_encod_data"], data[f"{ours}_recon_data"] = counts[..., :n_in], counts
        data[f"{ours}_starts"] = starts
    counts, starts, ends = split_counts(s, "test", BIN_SIZE)  # one window per bin, as scored
    data.update(bwb_test_heldin=counts[..., :n_in], bwb_test_heldout=counts[..., n_in:],
                bwb_test_starts=starts, bwb_test_ends=ends)
    ids = np.array(s.unit_ids)
    attrs = dict(bin_size=BIN_SIZE, eid=s.eid, bwb_source=os.path.abspath(s.path),
                 bwb_stride_bins=cfg.stride_bins, unit_ids=np.concatenate(
                     [ids[~s.held_out], ids[s.held_out]]).astype("S"),
                 bwb_heldout_ids=ids[s.held_out].astype("S"), **{f"bwb_{k}": v for k, v in
                                                                s.meta.items()})
    os.makedirs(cfg.out_dir, exist_ok=True)
    out = os.path.join(cfg.out_dir, f"bwb_{s.eid}.h5")
    write_h5(out, data, attrs)
    return out


def write_h5(path: str, data: dict, attrs: dict) -> None:
    """Atomically; counts as the smallest unsigned type, compressed."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key, value in data.items():
            if value.ndim == 3:
                f.create_dataset(key, data=value.astype(smallest_uint(value)),
                                 compression="gzip", shuffle=True, chunks=True)
            else:
                f.create_dataset(key, data=value)
        f.attrs.update(attrs)


# -----------------------------------------------------------------------------
# predictions: the file the leaderboard scores


@dataclass
class Prepared:
    """What predict, baseline and score read back from a prepared session file."""
    eid: str
    heldin: np.ndarray  # (W, T, N_in) test input
    targets: np.ndarray  # (W, T, K) test held-out counts
    starts: np.ndarray  # (W,) float64 window starts: BWB's window_timestamps
    heldout_ids: list  # (K,) uuids in the unit table's order
    meta: dict  # dataset_version, unit_filtering


def read_prepared(path: str) -> Prepared:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such session file (made by python -m src.bwb prepare)")
    with h5py.File(path, "r") as f:
        if "bwb_test_starts" not in f:
            raise DataError(f"{path}: no 'bwb_test_starts': not made by python -m src.bwb prepare")
        a = f.attrs
        return Prepared(str(a["eid"]), f["bwb_test_heldin"][()], f["bwb_test_heldout"][()],
                        f["bwb_test_starts"][()], [u.decode() for u in a["bwb_heldout_ids"]],
                        {"dataset_version": str(a["bwb_dataset_version"]),
                         "unit_filtering": str(a["bwb_unit_filtering"])})


def encode_ids(ids) -> torch.Tensor:
    """(K, width) uint8, each row an ASCII id padded with NUL (ibl_bwb_eval.entity_ids)."""
    rows = [s.encode("ascii") for s in ids]
    out = np.zeros((len(rows), max(map(len, rows))), dtype=np.uint8)
    for i, r in enumerate(rows):
        out[i, :len(r)] = np.frombuffer(r, dtype=np.uint8)
    return torch.from_numpy(out)


def prediction_fields(p: Prepared, log_rates: np.ndarray) -> dict:
    """The tensors of a prediction file: log expected counts per bin (W, T, K) in fp16, the
    window starts in float64 (the scorer aligns on them), unit ids '<eid>/<uuid>'."""
    return {"predictions": torch.from_numpy(np.asarray(log_rates, np.float32)).half(),
            "window_timestamps": torch.from_numpy(np.asarray(p.starts, np.float64)),
            "unit_ids": encode_ids([f"{p.eid}/{u}" for u in p.heldout_ids])}


def file_metadata(p: Prepared) -> dict:
    """The header fields BWB's test loop passes its writer (ts2_test_mixin.py)."""
    return {"recording_id": p.eid, "unit_filtering": p.meta["unit_filtering"],
            "dataset_version": p.meta["dataset_version"], "context_window": WINDOW,
            "bin_size": BIN_SIZE}


def prediction_path(out: str, label: str, eid: str, seed: int) -> str:
    return os.path.join(out, label, TASK, eid, f"seed_{seed}.safetensors")


def save_predictions(out: str, label: str, seed: int, p: Prepared, log_rates) -> str:
    """Through ibl_bwb_eval's PredictionsWriter when installed, else our writer (the same bytes:
    tests/test_bwb.py); written beside the target and renamed, so a crash leaves no half file."""
    path = prediction_path(out, label, p.eid, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".writing.")
    try:
        written = write_file(tmp, label, seed, p, prediction_fields(p, log_rates))
        os.replace(written, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_file(base: str, label: str, seed: int, p: Prepared, fields: dict) -> str:
    try:
        from ibl_bwb_eval.predictions import PredictionsWriter
    except ImportError:
        return our_writer(base, label, seed, p, fields)
    w = PredictionsWriter(enable=True, base_path=base, task=TASK, seed=seed, label=label,
                          metadata=file_metadata(p), path_fn=lambda b, m: b / m["recording_id"])
    w.add(predictions=fields["predictions"], dtype=torch.float16)
    w.add(window_timestamps=fields["window_timestamps"], dtype=torch.float64)
    w.set(unit_ids=fields["unit_ids"])
    w.save()
    return prediction_path(base, label, p.eid, seed)


def our_writer(base: str, label: str, seed: int, p: Prepared, fields: dict) -> str:
    """PredictionsWriter.save's file: the tensors (streamed fields first, then the constant
    one) and its header: label, task, seed, ibl_bwb_eval_version, then the metadata as str."""
    try:
        from safetensors.torch import save_file
    except ImportError as e:
        raise DataError("writing predictions needs safetensors: pip install -e '.[bwb]'") from e
    header = {"label": label, "task": TASK, "seed": str(seed),
              "ibl_bwb_eval_version": WRITER_VERSION,
              **{k: str(v) for k, v in file_metadata(p).items()}}
    path = prediction_path(base, label, p.eid, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(fields, path, metadata=header)
    return path


# -----------------------------------------------------------------------------
# the scores, as ibl_bwb_eval's scorer computes them (metrics/poisson_d2.py, metrics/bps.py)


def unit_sums(log_rates: torch.Tensor, counts: torch.Tensor) -> dict:
    """Per-unit sums over samples of (samples, K) float32 log rates and counts."""
    y = counts.float()
    return {"exp": torch.exp(log_rates).sum(0), "inter": (log_rates * y).sum(0),
            "tlt": torch.xlogy(y, y).sum(0), "y": y.sum(0),
            "n": torch.tensor(0.0) + log_rates.shape[0]}


def poisson_d2(s: dict, eps: float = 1e-9) -> float:
    """Poisson D2 (Cohen's pseudo-R2) per unit, averaged over units with spikes: 1 - (NLL -
    saturated NLL) / (null NLL - saturated NLL), the null being the unit's mean count."""
    valid = s["y"] > 0
    num = (s["exp"] - s["inter"]) - (s["y"] - s["tlt"])
    den = s["tlt"] - s["y"] * torch.log((s["y"] / s["n"]).clamp(min=eps))
    valid = valid & (den.abs() >= eps)
    return float((1 - num[valid] / den[valid]).mean()) if valid.any() else float("nan")


def bits_per_spike(s: dict, eps: float = 1e-9) -> float:
    """(null NLL - NLL) / (spikes ln 2), pooled over units (the NLB definition)."""
    null = s["y"] / s["n"]
    valid = null >= eps
    if not valid.any():
        return float("nan")
    null_loss = torch.sum(s["y"][valid] * (1 - torch.log(null[valid])))
    pred_loss = (s["exp"] - s["inter"])[valid].sum()
    return float((null_loss - pred_loss) / (s["y"][valid].sum() * torch.log(torch.tensor(2.0))))


def score_arrays(log_rates, counts) -> dict:
    """Both metrics of (W, T, K) log rates (as stored: fp16, upcast) against counts."""
    lr = torch.as_tensor(log_rates)
    k = lr.shape[-1]
    s = unit_sums(lr.reshape(-1, k).float(), torch.as_tensor(counts).reshape(-1, k).float())
    return {"poisson_d2": poisson_d2(s), "bps": bits_per_spike(s)}


def score_file(path: str, p: Prepared) -> dict:
    """A prediction file against the prepared targets, aligned on window starts as the scorer
    aligns them (np.intersect1d)."""
    from safetensors.torch import load_file

    pred = load_file(path)
    _, i_pred, i_gt = np.intersect1d(pred["window_timestamps"].numpy(), p.starts,
                                     return_indices=True)
    if len(i_pred) == 0:
        raise DataError(f"{path}: no window of it is a test window of {p.eid}")
    return score_arrays(pred["predictions"][i_pred], p.targets[i_gt])


def write_ground_truth(gt_dir: str, p: Prepared) -> str:
    """{gt_dir}/ts2-co_smoothing/<eid>/ground_truth.safetensors, the layout ibl_bwb_eval's
    scorer reads (window_timestamps, targets; unit_ids for the leaderboard's validator)."""
    from safetensors.torch import save_file

    path = os.path.join(gt_dir, TASK, p.eid, "ground_truth.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"window_timestamps": torch.from_numpy(p.starts.astype(np.float64)),
                   "targets": torch.from_numpy(p.targets.astype(np.float32)),
                   "unit_ids": encode_ids([f"{p.eid}/{u}" for u in p.heldout_ids])}, tmp)
    return path


# -----------------------------------------------------------------------------
# predict: our LFADS run -> a prediction file


def load_run(run_dir: str) -> tuple:
    """(the best checkpoint's model in eval mode, its config.json)."""
    from src.model import LFADS, LFADSConfig
    from src.runs import run_outputs

    run_outputs(run_dir)  # a DataError when it is not a run folder
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    if not isinstance(cfg["data"], str):
        raise DataError(f"{run_dir}: a stitched run; predict takes a run on one BWB session")
    path = os.path.join(run_dir, "ckpt_best.pt")
    if not os.path.isfile(path):
        path = os.path.join(run_dir, "ckpt_last.pt")
    if not os.path.isfile(path):
        raise DataError(f"{run_dir}: no checkpoint (ckpt_best.pt or ckpt_last.pt)")
    model = LFADS(LFADSConfig(**cfg["model"]))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["model"])
    return model.eval(), cfg


def lfads_log_rates(model, heldin: np.ndarray, n_samples: int, seed: int,
                    chunk: int = 2048) -> np.ndarray:
    """(W, T, K) log of the posterior-averaged expected counts of the held-out units, from the
    held-in input alone (the encoders read nothing else), a chunk of windows at a time."""
    from src.metrics import posterior_average

    torch.manual_seed(seed)  # the posterior samples
    n_in, out = model.cfg.n_in, []
    for i in range(0, len(heldin), chunk):
        x = torch.from_numpy(heldin[i:i + chunk].astype(np.float32))
        rates = posterior_average(model, x, None, n_samples)["rates"]  # (w, T, N)
        out.append(np.log(np.maximum(rates[:, :, n_in:], LOG_EPS)))
    return np.concatenate(out)


def predict(run_dir: str, label: str, out: str, n_samples: int | None = None) -> tuple:
    model, cfg = load_run(run_dir)
    p = read_prepared(cfg["data"])
    if model.cfg.n_out - model.cfg.n_in != len(p.heldout_ids):
        raise DataError(f"{run_dir}: the model reads out {model.cfg.n_out - model.cfg.n_in} "
                        f"held-out units, {cfg['data']} has {len(p.heldout_ids)}")
    seed = int(cfg["train"]["seed"])
    n = cfg["train"]["n_samples"] if n_samples is None else n_samples
    log_rates = lfads_log_rates(model, p.heldin, n, seed)
    path = save_predictions(out, label, seed, p, log_rates)
    return path, score_file(path, p)


# -----------------------------------------------------------------------------
# baselines: BWB's mean rate, and a ridge read-out of smoothed held-in counts


def mean_rate(path: str) -> np.ndarray:
    """(K,) log of each held-out unit's mean count per bin over the training windows, floored
    at LOG_EPS (BWB's MeanRate baseline, stat_baseline/base.py)."""
    with h5py.File(path, "r") as f:
        rec, n_in = f["train_recon_data"], f["train_encod_data"].shape[2]
        mean = rec[:, :, n_in:].astype(np.float64).mean(axis=(0, 1))
    return np.log(np.clip(mean, LOG_EPS, None))


def ridge_features(heldin: np.ndarray, sd_s: float) -> np.ndarray:
    """(W*T, N_in) held-in counts smoothed within each window by a Gaussian of SD sd_s."""
    from src.decode import smooth

    return smooth(heldin, sd_s, BIN_SIZE).reshape(-1, heldin.shape[2])


def fit_ridge(path: str, widths=(0.02, 0.05, 0.1), alphas=(1.0, 10.0, 100.0, 1e3, 1e4)):
    """Ridge from smoothed held-in counts to held-out counts per bin; the kernel width and the
    penalty chosen by 5-fold CV on the training windows alone. Returns (width, model)."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV, KFold

    with h5py.File(path, "r") as f:
        rec, n_in = f["train_recon_data"][()], f["train_encod_data"].shape[2]
    y = rec[:, :, n_in:].reshape(-1, rec.shape[2] - n_in).astype(np.float64)
    best = None
    for w in widths:
        gs = GridSearchCV(Ridge(), {"alpha": list(alphas)}, cv=KFold(5)).fit(
            ridge_features(rec[:, :, :n_in], w), y)
        if best is None or gs.best_score_ > best[0]:
            best = (gs.best_score_, w, gs.best_estimator_)
    return best[1], best[2]


def baseline_log_rates(kind: str, path: str, p: Prepared, chunk: int = 2000) -> np.ndarray:
    if kind == "mean-rate":
        return np.broadcast_to(mean_rate(path), p.targets.shape).astype(np.float32)
    width, model = fit_ridge(path)
    out = []
    for i in range(0, len(p.heldin), chunk):
        x = p.heldin[i:i + chunk]
        pred = model.predict(ridge_features(x, width)).reshape(len(x), T_BINS, -1)
        out.append(np.log(np.clip(pred, LOG_EPS, None)).astype(np.float32))
    return np.concatenate(out)


# -----------------------------------------------------------------------------
# check: the leaderboard's validation codes (app/validation/validate_submission.py), retyped


def _seed_codes(coverage: dict) -> list:
    """E101-E103: per task, one seed set for every session, at least 3 seeds, contiguous."""
    sets = {frozenset(v) for v in coverage.values()}
    if len(sets) > 1:
        return [("E103", "the sessions have different seed sets")]
    seeds = sorted(next(iter(sets))) if sets else []
    if len(seeds) < 3:
        return [("E101", f"{len(seeds)} seed(s) {seeds}; need at least 3")]
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        return [("E102", f"seeds {seeds} are not contiguous")]
    return []


def _file_codes(path: str, parts: tuple, p: Prepared | None) -> list:
    """E001-E003, E007, E008, E011-E013, E107-E109 of one prediction file."""
    from safetensors import safe_open

    label, task, rid, seed = parts
    with safe_open(path, framework="pt") as f:
        meta, keys = f.metadata() or {}, set(f.keys())
        need = {"label", "task", "seed", "unit_filtering", "dataset_version", "recording_id"}
        if need - set(meta) or {"predictions", "window_timestamps", "unit_ids"} - keys:
            return [("E001" if need - set(meta) else "E007", "missing fields or tensors")]
        t = {k: f.get_tensor(k) for k in keys}
    codes = []
    if meta["unit_filtering"] != "selected_units":
        codes.append(("E109" if meta["unit_filtering"] in
                      ("all_units", "custom", "mixed") else "E002", "unit_filtering"))
    if not re.match(r"^\d+\.\d+\.\d+$", meta["dataset_version"]):
        codes.append(("E003", f"dataset_version {meta['dataset_version']!r}"))
    if (meta["label"], meta["task"], meta["seed"], meta["recording_id"]) != (
            label, task, str(seed), rid):
        codes.append(("E013", "the header does not match the path"))
    pr, ts = t["predictions"], t["window_timestamps"]
    if pr.ndim != 3 or ts.ndim != 1 or ts.shape[0] != pr.shape[0]:
        return codes + [("E007", f"shapes {tuple(pr.shape)}, {tuple(ts.shape)}")]
    if ts.unique().numel() != ts.numel():
        codes.append(("E008", "duplicate window_timestamps"))
    if not pr.isfinite().all():
        codes.append(("E107", "NaN or Inf in predictions"))
    if p is None:
        return codes + [("E011", f"no prepared session for {rid}")]
    ids = {bytes(r).rstrip(b"\0").decode() for r in t["unit_ids"].numpy()}
    if set(ts.tolist()) != set(p.starts.tolist()) or ids != {
            f"{p.eid}/{u}" for u in p.heldout_ids}:
        codes.append(("E012", "window_timestamps or unit_ids differ from the test windows"))
    return codes


def check(pred_dir: str, data_dir: str) -> list:
    """(entry, code, detail) of every failed check of a label's folder (the zip's root):
    <label>/ts2-co_smoothing/<eid>/seed_<S>.safetensors; [] when it passes."""
    root = os.path.dirname(os.path.abspath(pred_dir))
    entries = sorted(os.path.relpath(p, root) for p in glob.glob(
        os.path.join(os.path.abspath(pred_dir), "**", "*"), recursive=True) if os.path.isfile(p))
    found, coverage, labels = [], {}, set()
    for e in entries:
        parts = e.split(os.sep)
        m = re.match(r"^seed_(\d+)\.safetensors$", parts[-1])
        if not parts[-1].startswith("seed_") or not parts[-1].endswith(".safetensors"):
            found.append((e, "E014", "unexpected file"))
        elif not m:
            found.append((e, "E004", "file name is not seed_<N>.safetensors"))
        elif len(parts) != 4 or parts[1] != TASK:
            found.append((e, "E005" if len(parts) == 4 else "E013", "path"))
        else:
            labels.add(parts[0])
            coverage.setdefault(parts[2], set()).add(int(m[1]))
            prepared = os.path.join(data_dir, f"bwb_{parts[2]}.h5")
            p = read_prepared(prepared) if os.path.isfile(prepared) else None
            parsed = (parts[0], parts[1], parts[2], int(m[1]))
            found += [(e, c, d) for c, d in _file_codes(os.path.join(root, e), parsed, p)]
    if len(labels) > 1:
        found.append((".", "E106", f"labels {sorted(labels)}"))
    return found + [(".", c, d) for c, d in _seed_codes(coverage)]


# -----------------------------------------------------------------------------
# synth: a synthetic session in BWB's layout, for the tests and the timings


@dataclass
class SynthConfig:
    eid: str = "00000000-0000-4000-8000-00000000b0b0"  # recording id of the synthetic session
    n_units: int = 200  # units of the unit table (a BWB eval session has a few hundred)
    minutes: float = 50.0  # length of the recording (an IBL session runs about an hour)
    rate_hz: float = 6.0  # median firing rate of a unit
    gain: float = 1.0  # how strongly the latent state modulates the log rates
    speed: float = 1.5  # Lorenz time units per second: a few cycles per second
    seed: int = 0  # draws units, rates, spikes and trials


def lorenz_latent(n_ms: int, speed: float, rng) -> np.ndarray:
    """(n_ms, 3) a Lorenz trajectory (sigma 10, rho 28, beta 8/3), integrated every 10 ms by
    Euler steps of speed / 100 time units and interpolated to 1 ms, then standardised."""
    n, dt = n_ms // 10 + 2, speed / 100
    z, x = np.empty((n, 3)), rng.normal(0, 5, 3) + (0, 0, 25)
    for i in range(n):  # plain floats: a numpy call per step would dominate
        a, b, c = x
        x = (a + dt * 10 * (b - a), b + dt * (a * (28 - c) - b), c + dt * (a * b - 8 / 3 * c))
        z[i] = x
    ms = np.arange(n_ms) / 10
    z = np.stack([np.interp(ms, np.arange(n), z[:, j]) for j in range(3)], 1)
    return (z - z.mean(0)) / z.std(0)


def synth_spikes(cfg: SynthConfig, rng) -> tuple:
    """(times (S,) sorted, unit_index (S,)): Poisson spikes of rates exp(b + W z(t)) at 1 ms."""
    n_ms = int(cfg.minutes * 60_000)
    z = lorenz_latent(n_ms, cfg.speed, rng)  # (n_ms, 3)
    w = rng.normal(0, cfg.gain / np.sqrt(3), (3, cfg.n_units))
    b = np.log(cfg.rate_hz * np.exp(rng.normal(0, 0.5, cfg.n_units)) / 1000)  # per ms
    times, units = [], []
    for m0 in range(0, n_ms, 60_000):  # a minute at a time: (60000, N) rates
        lam = np.exp(b + z[m0:m0 + 60_000] @ w)
        ms, u = np.nonzero(rng.poisson(lam))  # at most a spike per unit and ms, as spike sorting
        times.append((m0 + ms + rng.random(len(ms))) / 1000)
        units.append(u)
    t, u = np.concatenate(times), np.concatenate(units)
    order = np.argsort(t, kind="stable")
    return t[order], u[order]


def synth_trials(minutes: float, rng) -> tuple:
    """(starts, ends) of task-aligned intervals: 2.2-3.5 s long, one every 4-6 s."""
    starts = 5 + np.cumsum(rng.uniform(4, 6, int(minutes * 15)))
    starts = starts[starts < minutes * 60 - 10]
    return starts, starts + rng.uniform(2.2, 3.5, len(starts))


def chunked_splits(domain: tuple, trials: tuple) -> dict:
    """The ts2 split domains by pipeline.py's get_chunked_splits: 300 s chunks over the domain
    (torch-brain's Interval.arange with its short last chunk); a trial that straddles two
    chunks goes to the one holding more of it; each chunk after the first starts at the first
    trial starting 20 s after the previous chunk's end; chunks assigned train, test, train,
    val, test in turn; empty ones dropped. (The trial holding the recording's end, skipped by
    the pipeline, does not occur here.)"""
    start, end = domain
    whole = int(np.floor((end - start) / CHUNK_S))
    edges = np.linspace(start, start + whole * CHUNK_S, whole + 1, dtype=np.float64)
    if edges[-1] < end:
        edges = np.append(edges, end)
    c0, c1 = edges[:-1].copy(), edges[1:].copy()
    for s, e in zip(*trials):
        hit = np.flatnonzero((c0 <= e) & (c1 >= s))
        if len(hit) == 2:
            i, j = hit
            keep_first = min(e, c1[i]) - max(s, c0[i]) >= min(e, c1[j]) - max(s, c0[j])
            c1[i] = c0[j] = e if keep_first else s
    for i in range(1, len(c0)):
        later = trials[0][trials[0] >= c1[i - 1] + SPLIT_GAP_S]
        c0[i] = min(later[0], c1[i]) if len(later) else c1[i]
    role = np.array(["train", "test", "train", "val", "test"])[np.arange(len(c0)) % 5]
    ok = c0 < c1
    return {r: (c0[ok & (role == r)], c1[ok & (role == r)]) for r in ("train", "val", "test")}


def write_bwb(path: str, eid: str, times, units, unit_ids, trials, splits) -> None:
    """A session file in the layout torch-brain's Data.to_hdf5 writes (groups of Data,
    IrregularTimeSeries, ArrayDict and Interval objects, their attributes)."""
    def interval(g, s, e):
        g.create_dataset("start", data=np.asarray(s, np.float64))
        g.create_dataset("end", data=np.asarray(e, np.float64))
        g.attrs.update(_unicode_keys=np.array([], dtype="S1"), object="Interval",
                       timekeys=np.array([b"start", b"end"]))

    def data_group(g, **attrs):
        g.attrs.update(absolute_start=0.0, object="Data", **attrs)

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        data_group(f)
        data_group(f.create_group("brainset"), id=DIRNAME, derived_version="0.1.0",
                   origin_version="0.0.1", source="synthetic", unit_filtering="selected_units",
                   unit_filters="firing_rate,probe_qc,unit_qc")
        data_group(f.create_group("session"), id=eid)
        data_group(f.create_group("subject"), id="synthetic")
        sp = f.create_group("spikes")
        sp.create_dataset("timestamps", data=times)
        sp.create_dataset("unit_index", data=np.asarray(units, np.int64))
        grid = np.arange(times[0], times[-1] + 1.0, 1.0, dtype=np.float64)
        sp.create_dataset("timestamp_indices_1s", data=np.searchsorted(times, grid))
        interval(sp.create_group("domain"), [times[0]], [times[-1]])
        sp.attrs.update(_unicode_keys=np.array([], dtype="S1"), object="IrregularTimeSeries",
                        timekeys=np.array([b"timestamps"]))
        u = f.create_group("units")
        u.create_dataset("id", data=np.array(unit_ids).astype("S"))
        for salt in ("test", "val"):
            u.create_dataset(f"ts2_co_smoothing_is_held_out_{salt}",
                             data=held_out_mask(unit_ids, f"ts2_co_smoothing_{salt}"))
        u.attrs.update(_unicode_keys=np.array([b"id"]), object="ArrayDict")
        data_group(f.create_group("task_aligned_intervals"))
        interval(f.create_group("task_aligned_intervals/domain"), *trials)
        for split, (s, e) in splits.items():
            interval(f.create_group(f"ts2_{split}_domain"), s, e)
        interval(f.create_group("domain"), [times[0]], [times[-1]])


def synth(root: str, cfg: SynthConfig) -> str:
    """DATA_ROOT/ibl_brain_wide_bench_2026/eval/<eid>.h5: a Lorenz-driven session."""
    import uuid

    rng = np.random.default_rng(cfg.seed)
    ids = [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(cfg.n_units)]
    times, units = synth_spikes(cfg, rng)
    trials = synth_trials(cfg.minutes, rng)
    splits = chunked_splits((times[0], times[-1]), trials)
    path = os.path.join(root, DIRNAME, "eval", f"{cfg.eid}.h5")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_bwb(path, cfg.eid, times, units, ids, trials, splits)
    return path


# -----------------------------------------------------------------------------
# the command line


def config_args(p, cls, skip=()) -> None:
    """A --flag for each field of a config dataclass, its help the comment beside it."""
    from src.main import field_comments

    helps = field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default),
                           default=f.default, help=f"{helps.get(f.name, '')} "
                           "(default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(prog="python -m src.bwb", description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=FlagParser)
    pr = sub.add_parser("prepare", help="a BWB session file -> our session file")
    pr.add_argument("data_root", help=f"the folder holding {DIRNAME}/eval/<eid>.h5")
    config_args(pr, PrepareConfig)
    pd = sub.add_parser("predict", help="a run folder -> its prediction file and local score")
    pd.add_argument("run_dir", help="a run folder of src.main trained on a prepared session")
    pd.add_argument("--samples", type=int, default=None, help="posterior samples averaged "
                    "(default: the run's --n-samples; 0 = posterior means)")
    for q in (pd, sub.add_parser("baseline", help="the mean-rate or ridge baseline's file")):
        q.add_argument("--label", required=True, help="the submission's name (folder)")
        q.add_argument("--out", default="predictions", help="predictions root "
                       "(default: %(default)s)")
    bl = sub.choices["baseline"]
    bl.add_argument("session", help="a session file made by prepare")
    bl.add_argument("--kind", choices=("mean-rate", "ridge"), default="ridge",
                    help="which baseline (default: %(default)s)")
    bl.add_argument("--seed", type=int, default=EVAL_SEEDS[0], help="the seed in the file name "
                    "(the baselines are deterministic) (default: %(default)s)")
    for name, what in (("score", "score every prediction file under a folder"),
                       ("check", "the leaderboard's validation codes on a label's folder")):
        q = sub.add_parser(name, help=what)
        q.add_argument("pred_dir", help="predictions/<label>")
        q.add_argument("--data-dir", default="data", help="where prepare wrote bwb_<eid>.h5 "
                       "(default: %(default)s)")
    sub.choices["score"].add_argument("--gt-dir", default="", help="also write the targets "
                                      "as ground_truth.safetensors files for ibl_bwb_eval's scorer")
    sy = sub.add_parser("synth", help="a synthetic session in BWB's layout")
    sy.add_argument("data_root", help=f"writes <data_root>/{DIRNAME}/eval/<eid>.h5")
    config_args(sy, SynthConfig)
    return p


def fmt(scores: dict) -> str:
    return f"poisson_d2 {scores['poisson_d2']:.4f}, bps {scores['bps']:.4f}"


def cmd_score(a) -> int:
    files = sorted(glob.glob(os.path.join(a.pred_dir, "**", "seed_*.safetensors"),
                             recursive=True))
    if not files:
        raise DataError(f"{a.pred_dir}: no seed_*.safetensors files")
    per = {}  # (label, eid) -> scores of its seeds
    for path in files:
        label, eid = path.split(os.sep)[-4], path.split(os.sep)[-2]
        p = read_prepared(os.path.join(a.data_dir, f"bwb_{eid}.h5"))
        per.setdefault((label, eid), []).append(score_file(path, p))
        print(f"{path}: {fmt(per[label, eid][-1])}")
        if a.gt_dir:
            write_ground_truth(a.gt_dir, p)
    # the leaderboard's number: each seed's score clipped at 0, averaged over seeds, sessions
    for label in sorted({k[0] for k in per}):
        d2 = [np.mean([max(x["poisson_d2"], 0.0) for x in s]) for k, s in per.items()
              if k[0] == label]
        print(f"{label}: mean over {len(d2)} session(s) of the mean over seeds (each clipped "
              f"at 0): poisson_d2 {np.mean(d2):.4f}")
    return 0


def run_command(a) -> int:
    if a.command == "prepare":
        cfg = PrepareConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(
            PrepareConfig)})
        print(f"wrote {prepare(a.data_root, cfg)}")
    elif a.command == "synth":
        cfg = SynthConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(SynthConfig)})
        print(f"wrote {synth(a.data_root, cfg)}")
    elif a.command == "predict":
        path, scores = predict(a.run_dir, a.label, a.out, a.samples)
        print(f"wrote {path}\nlocal score (the test split's targets): {fmt(scores)}")
    elif a.command == "baseline":
        p = read_prepared(a.session)
        path = save_predictions(a.out, a.label, a.seed, p,
                                baseline_log_rates(a.kind, a.session, p))
        print(f"wrote {path}\nlocal score (the test split's targets): "
              f"{fmt(score_file(path, p))}")
    elif a.command == "score":
        return cmd_score(a)
    else:
        found = check(a.pred_dir, a.data_dir)
        for entry, code, detail in found:
            print(f"{entry}: {code} {detail}")
        print("FAIL" if found else f"PASS: {a.pred_dir}")
        return 1 if found else 0
    return 0


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return run_command(a)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
