"""Recordings without trials: cut into overlapping segments that train like trials, and the
segments' inferred rates merged back into one continuous series after training.

Segments are LEN bins long and start every LEN - OV bins, so consecutive segments share OV
bins; 2 * OV <= LEN, so a bin lies in at most two segments. Segments are numbered in time order
and split at random into train and valid, like trials; `{split}_inds` of the session file are
the segment numbers and `segment_starts` (segments,) their start times in seconds.

Merging (autolfads-tf2's merge_chops, the NLB tools' ChopInterface.merge): outside the overlaps
a bin has one segment's value; inside an overlap the earlier segment is weighted 1 - x^2 and
the later one x^2, with x rising from 0 to 1 across the overlap. The power 2 is theirs: it
favours the end of the earlier segment over the start of the later one, whose generator has
only just left its inferred initial condition. x is taken at bin centres, (k + 0.5) / OV for
k = 0..OV-1, where the references use linspace(1/OV, 1 - 1/OV, OV); that is symmetric and,
for OV = 1, weights the two segments 0.75 / 0.25 where theirs gives the later one everything.

Segments of both splits merge into one series covering the whole chopped span: the splits
alternate at random in time, so a series per split would be mostly gaps. `merged_valid` marks
the bins that lie in validation segments only: no training segment holds them, so they are the
ones to score validation on.

Legend: K segments, T bins per segment, N neurons, S bins of the merged series.
"""

import os
import shutil

import h5py
import numpy as np

from src.runs import run_outputs
from src.utils import atomic_path

MERGED = ("rates", "factors", "co_means")  # per-bin outputs of lfads_output.h5 that merge


def chop_bins(length: float, overlap: float, bin_size: float) -> tuple:
    """(LEN, OV) in bins from seconds; both must be whole numbers of bins."""
    out = []
    for flag, seconds in (("--chop", length), ("--overlap", overlap)):
        n = seconds / bin_size
        if abs(n - round(n)) > 1e-6:
            raise ValueError(f"{flag} {seconds:g}: not a whole number of {bin_size:g} s bins")
        out.append(int(round(n)))
    seg, ov = out
    if seg < 2:
        raise ValueError(f"--chop {length:g}: a segment needs at least 2 bins of {bin_size:g} s")
    if ov < 0 or 2 * ov > seg:
        raise ValueError(f"--overlap {overlap:g}: must be at least 0 and at most half of --chop "
                         f"{length:g}, so that a bin lies in at most two segments")
    return seg, ov


def segment_starts(t0: float, t1: float, seg: int, ov: int, bin_size: float) -> np.ndarray:
    """Start times (K,) of the segments of seg bins every seg - ov bins that fit in [t0, t1]."""
    step = seg - ov
    k = int(np.floor(((t1 - t0) / bin_size - seg) / step + 1e-9)) + 1
    return t0 + np.arange(max(k, 0)) * step * bin_size


def edge_weights(ov: int) -> np.ndarray:
    """(OV,) weight of the later segment across an overlap; the earlier one gets 1 minus it."""
    x = (np.arange(ov) + 0.5) / ov
    return x**2


def merge_segments(segs, numbers, seg: int, ov: int) -> np.ndarray:
    """Segments (K, T, N) numbered `numbers` (K,) in time order -> one series (S, N). A bin no
    segment covers is NaN."""
    numbers = np.asarray(numbers, dtype=np.int64)
    step, rise = seg - ov, edge_weights(ov)
    weight = np.ones((len(numbers), seg))  # (K, T)
    present = set(numbers.tolist())
    for i, k in enumerate(numbers):  # an edge without a neighbour keeps its full weight
        if ov and k - 1 in present:
            weight[i, :ov] = rise
        if ov and k + 1 in present:
            weight[i, seg - ov:] = 1 - rise
    n_bins = int(numbers.max()) * step + seg
    total = np.zeros((n_bins, segs.shape[2]))  # (S, N)
    wsum = np.zeros(n_bins)
    for i, k in enumerate(numbers):
        at = slice(k * step, k * step + seg)
        total[at] += weight[i, :, None] * segs[i]
        wsum[at] += weight[i]
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / wsum[:, None]  # wsum is 1 (to rounding) wherever a segment lies


def is_chopped(path: str) -> bool:
    """Whether a session file holds chopped segments rather than trials (attributes only)."""
    try:
        with h5py.File(path, "r") as f:
            return "chop_bins" in f.attrs
    except OSError:
        return False


def merge_run(run_dir: str) -> list:
    """Merge the segments of every chopped session of a trained run into continuous series,
    added to its lfads_output.h5 (atomically): merged_{rates,factors,co_means} (S, N or F or
    U), merged_times (S,) bin start times in seconds, merged_valid (S,) bool (valid_bins).
    Returns the output files written (none when no session of the run is chopped)."""
    written = []
    for path, name in run_outputs(run_dir):
        if is_chopped(path):
            out = os.path.join(run_dir, name)
            merge_output(path, out)
            written.append(out)
    return written


def merge_output(session_path: str, output_path: str) -> None:
    """Add the merged series of one chopped session to its output file."""
    with h5py.File(session_path, "r") as f:
        seg, ov = int(f.attrs["chop_bins"]), int(f.attrs["chop_overlap_bins"])
        bin_size, starts = float(f.attrs["bin_size"]), f["segment_starts"][()]
        inds = {s: f[f"{s}_inds"][()] for s in ("train", "valid")}
    numbers = np.concatenate([inds["train"], inds["valid"]])
    merged = {}
    with h5py.File(output_path, "r") as f:
        for name in MERGED:
            if f"train_{name}" in f:
                segs = np.concatenate([f[f"train_{name}"][()], f[f"valid_{name}"][()]])
                merged[name] = merge_segments(segs, numbers, seg, ov)
    valid_only = valid_bins(inds, len(merged["rates"]), seg, ov)
    with atomic_path(output_path) as tmp:
        shutil.copyfile(output_path, tmp)  # the other outputs stay as they are
        with h5py.File(tmp, "a") as f:
            for name, value in merged.items():
                _replace(f, f"merged_{name}", value.astype(np.float32))
            _replace(f, "merged_times", starts[0] + np.arange(len(valid_only)) * bin_size)
            _replace(f, "merged_valid", valid_only)
            f["merged_rates"].attrs["blend"] = (
                f"segments of {seg} bins every {seg - ov}; in the {ov}-bin overlaps the earlier "
                "segment weighs 1 - x^2 and the later x^2, x = (k + 0.5) / overlap")


def valid_bins(inds: dict, n_bins: int, seg: int, ov: int) -> np.ndarray:
    """(S,) bool: bins inside a validation segment and inside no training segment, the only
    bins no training step has seen."""
    covered = {}
    for split, numbers in inds.items():
        covered[split] = np.zeros(n_bins, dtype=bool)
        for k in numbers:
            covered[split][k * (seg - ov):k * (seg - ov) + seg] = True
    return covered["valid"] & ~covered["train"]


def _replace(f, key, value):
    if key in f:
        del f[key]
    f.create_dataset(key, data=value, compression="gzip")
