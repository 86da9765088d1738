"""An NWB file (DANDI, the Neural Latents Benchmark) -> one LFADS session file <out-dir>/<stem>.h5.

    python -m src.prep_nwb FILE.nwb --align move_onset_time --window -0.25 0.45
    python -m src.prep_nwb FILE.nwb --heldout-col heldout --trials-filter split=train
    python -m src.prep_nwb FILE.nwb --region M1 --units-filter quality=good
    python -m src.prep_nwb FILE.nwb --chop 1.0 --overlap 0.2       # no trials: segments

Units come from the units table (spike times), optionally kept by a column's value or by the
location of their electrode in the electrodes table; windows are aligned to a trials-table
column; every behaviour time series of processing['behavior'] is binned into the same bins
({split}_behavior); the trials table's numeric columns go to trials/ (index with
{split}_inds). Held-out units and the train/valid split are drawn as prep_data draws them.
With --chop the trials table is not used: the recording is cut into overlapping segments
(src/chop.py), and training then merges the segments' rates back into one series.

The file is written under a temporary name and renamed when complete. docs/your_data.md has
the details. Needs the `nwb` extra (pynwb).
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import h5py
import numpy as np

from src.binning import bin_signal, bin_spikes, smallest_uint, split_trials
from src.chop import chop_bins, segment_starts
from src.main import field_comments
from src.utils import FlagParser, HelpFormatter, atomic_path

# Legend: K windows (trials or segments), T bins per window, N units, D behaviour dimensions.


@dataclass
class NWBConfig:
    align: str = "move_onset_time"  # trials-table column the windows are aligned to
    window: tuple = (-0.25, 0.45)  # seconds around the event, START END (NLB MC_Maze's)
    bin_size: float = 0.01  # seconds per bin
    out_dir: str = "data"  # folder of the session file <out-dir>/<stem of FILE>.h5
    units_filter: tuple = ()  # keep the units whose units-table column COL is VALUE: quality=good
    region: tuple = ()  # keep the units whose electrode's location is one of these
    trials_filter: tuple = ()  # keep the trials whose trials-table column COL is VALUE: split=train
    heldout_frac: float = 0.25  # share of units held out, drawn at random as prep_data does
    heldout_col: str = ""  # a boolean units-table column that marks held-out units instead
    fp_bins: int = 0  # last bins of each window the encoders do not see (forward prediction)
    valid_frac: float = 0.2  # share of trials (or segments) in the validation split
    seed: int = 0  # for the train/valid split and the held-out units
    behavior: tuple = ()  # series of processing['behavior'] to bin (default: every one)
    chop: float = 0.0  # seconds per segment: cut the whole recording instead of trials (0: off)
    overlap: float = 0.0  # seconds shared by consecutive segments, at most half of --chop


class NWBError(ValueError):
    """A property of the input a user can act on; the message names the file and column."""


def note(notes: list, text: str) -> None:
    """Tell the user now, and keep it for the file's `notes` attribute."""
    print(f"note: {text}", file=sys.stderr)
    notes.append(text)


# ---------------------------------------------------------------------------------------------
# reading


def open_nwb(path: str):
    """An open pynwb.NWBHDF5IO on `path`, checked to be an NWB file."""
    try:
        from pynwb import NWBHDF5IO
    except ImportError as e:
        raise NWBError("reading NWB files needs pynwb: ./setup.sh --nwb installs it") from e

    if not os.path.isfile(path):
        raise NWBError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            version = f.attrs.get("nwb_version")
    except OSError as e:
        raise NWBError(f"{path}: not an NWB file (not HDF5 at all: {e})") from e
    if version is None:
        raise NWBError(f"{path}: not an NWB file (an HDF5 file without the 'nwb_version' "
                       "attribute); for a file of your own format see docs/your_data.md")
    return NWBHDF5IO(path, "r", load_namespaces=True)


def ragged(table, col: str) -> tuple:
    """(flat values, row of each value) of a ragged column, e.g. spike_times."""
    index = table[col]
    ends = np.asarray(index.data[:], dtype=np.int64)
    rows = np.repeat(np.arange(len(ends)), np.diff(ends, prepend=0))
    return np.asarray(index.target.data[:]), rows


def column(table, col: str, what: str, path: str) -> np.ndarray:
    if col not in table.colnames:
        raise NWBError(f"{path}: the {what} table has no column '{col}' (it has: "
                       f"{', '.join(table.colnames)})")
    values = np.asarray(table[col].data[:])
    if len(values) != len(table):
        raise NWBError(f"{path}: column '{col}' of the {what} table is ragged; expected one "
                       "value per row")
    return values


def equals(values: np.ndarray, want: str) -> np.ndarray:
    """values == want, with want read as the column's type (bool, number or text)."""
    if values.dtype == bool:
        return values == (want.lower() in ("1", "true", "yes"))
    if np.issubdtype(values.dtype, np.number):
        return values == float(want)
    return np.array([(v.decode() if isinstance(v, bytes) else str(v)) == want for v in values])


def filter_rows(table, filters, what: str, path: str) -> np.ndarray:
    """Mask of the rows meeting every COL=VALUE filter."""
    keep = np.ones(len(table), dtype=bool)
    for item in filters:
        col, sep, want = item.partition("=")
        if not sep:
            raise NWBError(f"--{what}s-filter {item}: expected COL=VALUE")
        values = column(table, col, what, path)
        try:
            keep &= equals(values, want)
        except ValueError as e:  # a word for a numeric column
            raise NWBError(f"--{what}s-filter {item}: column '{col}' holds numbers") from e
        if not keep.any():
            raise NWBError(f"{path}: no {what} left after --{what}s-filter {item}")
    return keep


def unit_locations(nwb, path: str):
    """Location of each unit's (first) electrode, or None when the file does not say."""
    units = nwb.units
    if "electrodes" in units.colnames and nwb.electrodes is not None:
        rows, unit = ragged(units, "electrodes")
        first = rows[np.r_[0, np.flatnonzero(np.diff(unit)) + 1]] if rows.size else rows
        if len(np.unique(unit)) == len(units):
            loc = np.asarray(nwb.electrodes["location"].data[:])[first]
            return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in loc])
    if "electrode_group" in units.colnames:
        return np.array([g.location for g in units["electrode_group"].data[:]])
    return None


def select_units(nwb, cfg: NWBConfig, path: str) -> tuple:
    """Rows of the units table to keep, and their locations (None if unknown)."""
    units = nwb.units
    if units is None or len(units) == 0:
        raise NWBError(f"{path}: no units table (spike-sorted units): nothing to bin. DANDI "
                       "files with 'ecephys' in their name usually have one")
    if "spike_times" not in units.colnames:
        raise NWBError(f"{path}: the units table has no spike_times column")
    keep = filter_rows(units, cfg.units_filter, "unit", path)
    locations = unit_locations(nwb, path)
    if cfg.region:
        if locations is None:
            raise NWBError(f"{path}: --region needs the units' electrodes (an 'electrodes' or "
                           "'electrode_group' column of the units table); this file has none")
        keep &= np.isin(locations, cfg.region)
        if not keep.any():
            raise NWBError(f"{path}: no unit in --region {' '.join(cfg.region)} (locations "
                           f"present: {', '.join(sorted(set(locations)))})")
    rows = np.flatnonzero(keep)
    return rows, None if locations is None else locations[rows]


def recording_span(nwb, times: np.ndarray) -> tuple:
    """(start, end) seconds of the recording: the units' observation intervals when the file
    has them, else from the first spike (or trial start) to the last spike (or trial stop)."""
    units = nwb.units
    if "obs_intervals" in units.colnames:
        iv, _ = ragged(units, "obs_intervals")
        if iv.size:
            return float(iv[:, 0].min()), float(iv[:, 1].max())
    lo, hi = float(times.min(initial=np.inf)), float(times.max(initial=-np.inf))
    if nwb.trials is not None and len(nwb.trials):
        lo = min(lo, float(np.nanmin(nwb.trials["start_time"].data[:])))
        hi = max(hi, float(np.nanmax(nwb.trials["stop_time"].data[:])))
    return lo, hi


def observed_intervals(nwb, rows) -> list | None:
    """The distinct observed intervals of the units `rows`, each (n, 2) seconds [start, stop),
    from the units table's obs_intervals; None when the file has no such column."""
    units = nwb.units
    if "obs_intervals" not in units.colnames:
        return None
    iv, unit_of = ragged(units, "obs_intervals")
    iv = np.asarray(iv, np.float64).reshape(-1, 2)
    sets = {tuple(map(tuple, iv[unit_of == r])) for r in rows}
    return [np.asarray(s, np.float64).reshape(-1, 2) for s in sets]


def inside_observed(starts, ends, intervals: list) -> np.ndarray:
    """(K,) bool: window k, [starts[k], ends[k]), lies inside one observed interval of every
    unit. A window across a gap would bin the gap's missing spikes as zeros."""
    starts, ends = np.asarray(starts, np.float64), np.asarray(ends, np.float64)
    ok = np.ones(starts.shape, dtype=bool)
    for iv in intervals:  # (n, 2)
        inside = (iv[None, :, 0] <= starts[:, None] + 1e-9) & (
            ends[:, None] <= iv[None, :, 1] + 1e-9)  # (K, n)
        ok &= inside.any(axis=1)
    return ok


def behaviour_series(nwb, names) -> list:
    """[(name, TimeSeries)] of processing['behavior'], containers (Position, ...) opened."""
    module = nwb.processing.get("behavior")
    if module is None:
        if names:
            raise NWBError("--behavior: the file has no processing['behavior'] module")
        return []
    found = {}
    for name, item in module.data_interfaces.items():
        inner = getattr(item, "time_series", None) or getattr(item, "spatial_series", None)
        found.update(inner if inner is not None else {name: item})
    found = {k: v for k, v in found.items() if hasattr(v, "data") and hasattr(v, "unit")}
    missing = [n for n in names if n not in found]
    if missing:
        raise NWBError(f"--behavior {' '.join(missing)}: not in processing['behavior'] (it has:"
                       f" {', '.join(sorted(found))})")
    return [(n, found[n]) for n in (names or sorted(found))]


def series_times(ts) -> np.ndarray:
    if ts.timestamps is not None:
        return np.asarray(ts.timestamps[:], dtype=np.float64)
    return ts.starting_time + np.arange(len(ts.data)) / ts.rate


# ---------------------------------------------------------------------------------------------
# windows


def trial_windows(nwb, cfg: NWBConfig, span: tuple, n_bins: int, units, path: str,
                  notes) -> tuple:
    """(start times (K,), rows of the trials table (K,)) of the trials kept: those with an
    event whose window lies inside the recording and inside the observed intervals of the
    units (rows of the units table)."""
    trials = nwb.trials
    if trials is None or len(trials) == 0:
        raise NWBError(f"{path}: no trials table, so nothing to align to; cut the recording "
                       "into segments instead with --chop LEN --overlap OV")
    event = column(trials, cfg.align, "trial", path)
    if not np.issubdtype(event.dtype, np.number):
        raise NWBError(f"{path}: --align {cfg.align}: the column holds {event.dtype} values, "
                       "not times in seconds")
    event = event.astype(np.float64)
    keep = filter_rows(trials, cfg.trials_filter, "trial", path)
    starts = event + cfg.window[0]
    no_event = keep & ~np.isfinite(event)
    if no_event.any():
        note(notes, f"{no_event.sum()} of {len(event)} trials dropped: no {cfg.align} (NaN)")
    keep &= np.isfinite(event)
    off = keep & ((starts < span[0] - 1e-9) | (starts + n_bins * cfg.bin_size > span[1] + 1e-9))
    if off.any():
        note(notes, f"{off.sum()} of {len(event)} trials dropped: their window {cfg.window[0]:g} "
                    f"to {cfg.window[1]:g} s around {cfg.align} runs off the recording "
                    f"({span[0]:g} to {span[1]:g} s)")
    keep &= ~off
    observed = observed_intervals(nwb, units)
    if observed is not None:
        gap = keep & ~inside_observed(starts, starts + n_bins * cfg.bin_size, observed)
        if gap.any():
            note(notes, f"{gap.sum()} of {len(event)} trials dropped: their window "
                        f"{cfg.window[0]:g} to {cfg.window[1]:g} s around {cfg.align} leaves "
                        "the units' observed intervals (obs_intervals of the units table), so "
                        "part of it lies in a gap of the recording")
        keep &= ~gap
    if keep.sum() < 2:
        raise NWBError(f"{path}: {keep.sum()} trials left, fewer than 2 (one train, one valid)")
    rows = np.flatnonzero(keep)
    return starts[rows], rows


def chop_windows(cfg: NWBConfig, span: tuple, path: str, notes) -> tuple:
    """(start times (K,), segment numbers (K,)) of the segments that fit in the recording."""
    seg, ov = chop_bins(cfg.chop, cfg.overlap, cfg.bin_size)
    starts = segment_starts(span[0], span[1], seg, ov, cfg.bin_size)
    if starts.size < 2:
        raise NWBError(f"{path}: the recording ({span[0]:g} to {span[1]:g} s) holds "
                       f"{starts.size} segment(s) of --chop {cfg.chop:g} s; need 2 at least")
    tail = span[1] - (starts[-1] + seg * cfg.bin_size)
    if tail > cfg.bin_size:
        note(notes, f"the last {tail:.3f} s of the recording are shorter than a segment and "
                    "are left out")
    return starts, np.arange(starts.size)


# ---------------------------------------------------------------------------------------------
# binning


def bin_behaviour(series, starts, cfg: NWBConfig, n_bins: int, notes) -> tuple:
    """(values (K, T, D) float32, names (D,), units) of the behaviour series, or None. units is
    one string, as the decoder reads it: the series' common unit, else one per dimension
    joined by commas."""
    values, names, units = [], [], []
    for name, ts in series:
        t = series_times(ts)
        x = np.asarray(ts.data[:], dtype=np.float64).reshape(len(t), -1)  # (samples, D)
        rate = 1 / np.median(np.diff(t)) if t.size > 1 else 0.0
        how = ("averaged over the samples in each bin" if rate * cfg.bin_size >= 1 else
               "resampled: linearly interpolated at bin centres where a bin holds no sample")
        if abs(rate * cfg.bin_size - 1) > 1e-3:
            note(notes, f"behaviour {name}: sampled at {rate:g} Hz, not the bins' "
                        f"{1 / cfg.bin_size:g} Hz; {how}")
        outside = (starts < t.min()) | (starts + n_bins * cfg.bin_size > t.max() + 1 / rate)
        if outside.any():
            note(notes, f"behaviour {name}: {outside.sum()} windows reach past its samples "
                        f"({t.min():g} to {t.max():g} s); held at its first or last value")
        if not np.isfinite(x).any(axis=0).all():
            raise NWBError(f"behaviour {name}: a dimension with no finite sample")
        values.append(bin_signal(t, x, starts, n_bins, cfg.bin_size))
        names += dimension_names(name, ts, x.shape[1])
        units += [ts.unit] * x.shape[1]
    if not values:
        return None
    units = units[0] if len(set(units)) == 1 else ", ".join(units)
    return np.concatenate(values, axis=2), names, units


def dimension_names(name: str, ts, d: int) -> list:
    """hand_vel -> hand_vel_x, hand_vel_y: the columns a series' comments name ("columns=[x,y]",
    as NLB's files and tools do), else x, y, z, else 0, 1, ..."""
    comments = str(getattr(ts, "comments", "") or "")
    cols = comments.split("[")[-1].split("]")[0].split(",") if "columns=" in comments else []
    if len(cols) != d:
        cols = list("xyz") if d <= 3 else [str(i) for i in range(d)]
    return [name] if d == 1 else [f"{name}_{c.strip()}" for c in cols[:d]]


def drop_silent(counts, rows, locations, ids, path: str, notes) -> tuple:
    """Units without a spike in any window cannot be modelled: drop them and say which."""
    silent = counts.sum(axis=(0, 1)) == 0
    if silent.any():
        note(notes, f"{silent.sum()} units dropped: no spike in any window (unit ids "
                    f"{', '.join(map(str, ids[rows[silent]][:10]))}"
                    f"{' ...' if silent.sum() > 10 else ''})")
    if (~silent).sum() < 2:
        raise NWBError(f"{path}: {(~silent).sum()} units with spikes in the windows; need 2 "
                       "at least (one held in, one held out)")
    keep = ~silent
    return counts[:, :, keep], rows[keep], None if locations is None else locations[keep]


def choose_heldout(nwb, rows, cfg: NWBConfig, rng, path: str) -> np.ndarray:
    """(N,) bool: held-out units, from --heldout-col or drawn as prep_data draws them."""
    if cfg.heldout_col:
        flags = column(nwb.units, cfg.heldout_col, "unit", path)[rows].astype(bool)
        if flags.all():
            raise NWBError(f"{path}: every unit kept has {cfg.heldout_col} true; LFADS needs "
                           "held-in units")
        return flags
    n_out = min(int(round(cfg.heldout_frac * rows.size)), rows.size - 1)  # keep one held in
    heldout = np.zeros(rows.size, dtype=bool)
    heldout[rng.choice(rows.size, n_out, replace=False)] = True
    return heldout


# ---------------------------------------------------------------------------------------------
# writing


def write_session(path: str, counts, behaviour, inds, split, cfg, n_in, extra: dict, attrs):
    """The session file src.main reads: counts (K, T, N) held-in columns first; split:
    {train, valid} -> rows of counts; inds (K,) trial rows or segment numbers."""
    dtype = smallest_uint(counts)
    gz = {"compression": "gzip", "compression_opts": 4}
    t_enc = counts.shape[1] - cfg.fp_bins
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name, k in split.items():
            c = counts[k].astype(dtype)  # (trials, T, N)
            f.create_dataset(f"{name}_encod_data", data=c[:, :t_enc, :n_in], **gz)
            f.create_dataset(f"{name}_recon_data", data=c, **gz)
            f[f"{name}_inds"] = inds[k]
            if behaviour is not None:
                d = f.create_dataset(f"{name}_behavior", data=behaviour[0][k], **gz)
                d.attrs["names"], d.attrs["units"] = behaviour[1], behaviour[2]
        for key, value in extra.items():
            if isinstance(value, dict):  # the trials table
                g = f.create_group(key)
                for col, v in value.items():
                    g[col] = v
            else:
                f[key] = value
        f.attrs.update(attrs)


def trials_table(nwb) -> dict:
    """Numeric and boolean columns of the trials table, as float64 (one value per row)."""
    out = {}
    for col in nwb.trials.colnames if nwb.trials is not None else ():
        values = np.asarray(nwb.trials[col].data[:])
        if values.ndim == 1 and len(values) == len(nwb.trials) and (
                np.issubdtype(values.dtype, np.number) or values.dtype == bool):
            out[col] = values.astype(np.float64)
    return out


def provenance(nwb, path: str, cfg: NWBConfig, span: tuple, notes: list) -> dict:
    """File attributes: where the data came from, what a bin means, and every setting."""
    chopped = cfg.chop > 0
    if chopped:
        seg, ov = chop_bins(cfg.chop, cfg.overlap, cfg.bin_size)
        how = {"chop_len": cfg.chop, "chop_overlap": cfg.overlap, "chop_bins": seg,
               "chop_overlap_bins": ov, "span": span}  # what src/chop.py merges with
    else:
        how = {"window": cfg.window}
    return {**how, "source": os.path.abspath(path), "identifier": str(nwb.identifier),
            "session_start_time": nwb.session_start_time.isoformat(),
            "session_description": str(nwb.session_description),
            "bin_size": cfg.bin_size, "fp_bins": cfg.fp_bins,
            # what a bin means: sessions stitched into one model must agree on it
            "align_event": "chop" if chopped else cfg.align,
            "t_before": 0.0 if chopped else -cfg.window[0],
            "t_after": cfg.chop if chopped else cfg.window[1],
            "settings": json.dumps({k: list(v) if isinstance(v, tuple) else v
                                    for k, v in dataclasses.asdict(cfg).items()}),
            "notes": json.dumps(notes), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


# ---------------------------------------------------------------------------------------------
# the whole preparation


def n_window_bins(cfg: NWBConfig) -> int:
    t0, t1 = (0.0, cfg.chop) if cfg.chop > 0 else cfg.window
    n = (t1 - t0) / cfg.bin_size
    if t1 <= t0 or abs(n - round(n)) > 1e-6:
        raise NWBError(f"--window {t0:g} {t1:g}: START must be below END and the length a whole "
                       f"number of --bin-size {cfg.bin_size:g} bins")
    if not 0 <= cfg.fp_bins < round(n):
        raise NWBError(f"--fp-bins {cfg.fp_bins}: must be at least 0 and below the "
                       f"{round(n)} bins of a window")
    return int(round(n))


def check_config(cfg: NWBConfig) -> None:
    if not cfg.bin_size > 0:
        raise NWBError(f"--bin-size {cfg.bin_size:g}: must be above 0")
    if not 0 <= cfg.heldout_frac < 1:
        raise NWBError(f"--heldout-frac {cfg.heldout_frac:g}: must be at least 0 and below 1")
    if not 0 < cfg.valid_frac < 1:
        raise NWBError(f"--valid-frac {cfg.valid_frac:g}: must be above 0 and below 1")
    if cfg.chop > 0:
        chop_bins(cfg.chop, cfg.overlap, cfg.bin_size)
    elif cfg.overlap:
        raise NWBError("--overlap needs --chop")
    n_window_bins(cfg)


def prepare(path: str, cfg: NWBConfig) -> str:
    """Read the NWB file at `path`, bin it and write <out-dir>/<stem>.h5; return that path."""
    check_config(cfg)
    n_bins, notes = n_window_bins(cfg), []
    out = os.path.join(cfg.out_dir, os.path.splitext(os.path.basename(path))[0] + ".h5")
    with open_nwb(path) as io:
        nwb = io.read()
        rows, locations = select_units(nwb, cfg, path)
        times, unit_of = ragged(nwb.units, "spike_times")
        span = recording_span(nwb, times[np.isin(unit_of, rows)])
        if cfg.chop > 0:
            starts, inds = chop_windows(cfg, span, path, notes)
        else:
            starts, inds = trial_windows(nwb, cfg, span, n_bins, rows, path, notes)
        counts = bin_spikes(times, unit_of, rows, starts, n_bins, cfg.bin_size)  # (K, T, N)
        ids = np.asarray(nwb.units.id[:])
        counts, rows, locations = drop_silent(counts, rows, locations, ids, path, notes)
        behaviour = bin_behaviour(behaviour_series(nwb, cfg.behavior), starts, cfg, n_bins,
                                  notes)
        rng = np.random.default_rng(cfg.seed)
        train, valid = split_trials(starts.size, cfg.valid_frac, rng)
        heldout = choose_heldout(nwb, rows, cfg, rng, path)
        order = np.r_[np.flatnonzero(~heldout), np.flatnonzero(heldout)]  # held-in first
        extra = {"unit_ids": ids[rows[order]]}
        if locations is not None:
            extra["locations"] = locations[order].astype("S")
        extra.update({"segment_starts": starts} if cfg.chop > 0 else
                     {"trials": trials_table(nwb), "trials_kept": inds})
        attrs = provenance(nwb, path, cfg, span, notes)
        attrs.update(n_heldin=int((~heldout).sum()), n_heldout=int(heldout.sum()))
    os.makedirs(cfg.out_dir, exist_ok=True)
    write_session(out, counts[:, :, order], behaviour, inds, {"train": train, "valid": valid},
                  cfg, int((~heldout).sum()), extra, attrs)
    return out


# how each flag is spelt in --help
METAVARS = {"align": "COL", "window": ("START", "END"), "bin_size": "S", "out_dir": "DIR",
            "units_filter": "COL=VALUE", "region": "LOCATION", "trials_filter": "COL=VALUE",
            "heldout_frac": "F", "heldout_col": "COL", "fp_bins": "N", "valid_frac": "F",
            "seed": "N", "behavior": "NAME", "chop": "LEN", "overlap": "OV"}


def build_parser() -> argparse.ArgumentParser:
    """One flag per NWBConfig field; its help is the field's comment."""
    p = FlagParser(prog="python -m src.prep_nwb", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("file", metavar="FILE.nwb", help="the NWB file")
    comments = field_comments(NWBConfig)
    for f in dataclasses.fields(NWBConfig):
        d = f.default
        kind = ({"nargs": 2, "type": float} if f.name == "window" else {"nargs": "+"}
                if isinstance(d, tuple) else {} if isinstance(d, str) else {"type": type(d)})
        shown = " ".join(map(str, d)) if isinstance(d, tuple) else d
        help = comments[f.name].replace("%", "%%") + (f" (default: {shown})" if shown != "" else "")
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=d, help=help,
                       metavar=METAVARS[f.name], **kind)
    return p


def main(argv=None) -> int:
    a = vars(build_parser().parse_args(argv))
    path = a.pop("file")
    cfg = NWBConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in a.items()})
    try:
        out = prepare(path, cfg)
    except (ValueError, OSError) as e:  # NWBError, and a bad --chop
        print(f"error: {e}", file=sys.stderr)
        return 2
    with h5py.File(out, "r") as f:
        k = len(f["train_inds"]) + len(f["valid_inds"])
        print(f"wrote {out}: {k} {'segments' if cfg.chop > 0 else 'trials'} x "
              f"{f['train_recon_data'].shape[1]} bins x {f['train_recon_data'].shape[2]} units")
    return 0


if __name__ == "__main__":
    sys.exit(main())
