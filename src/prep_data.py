"""IBL Neuropixels recordings -> LFADS session files, one data/<pid>.h5 per probe insertion.

    python -m src.prep_data                                  # the whole release (large!)
    python -m src.prep_data --pids f475ae14-9415-453e-b800-1480ea1c868d
    python -m src.prep_data --regions MOs MOp --align stimOn_times --window -0.2 0.8 --bin-size 0.01
    python -m src.prep_data --local --cache-dir DIR          # offline, on an existing ONE cache
    python -m src.prep_data --export-anatomy media/anatomy.csv   # refresh the region table

For each brain-wide-map insertion (release tag 2024_Q2_IBL_et_al_BWM_iblsort, spike sorting
revision 2024-05-06): load clusters and channels (small), keep the good units (clusters.metrics
label == 1) in the requested regions and their descendants, and only then load spike times and
trials; bin the spikes of those units in windows around a task event, on the trials that pass
the brain-wide-map filters; split trials into train/valid and units into held-in/held-out; write
the file (see DESIGN.md section 2, and the README for the keys). Every insertion gets a row in
data/manifest.csv (ok / skipped / failed, with the reason); a rerun skips what is done.

A standalone script: it needs the `ibl` extra (ONE-api, ibllib, iblatlas) but nothing else of
this project, and in particular no torch.
"""

import argparse
import csv
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

log = logging.getLogger("prep_data")

PUBLIC_URL = "https://openalyx.internationalbrainlab.org"
# the public read-only account, published by IBL in the ONE docs; ONE-api >= 3.6 no longer
# defaults the username, so it is passed explicitly
PUBLIC_USER, PUBLIC_PASSWORD = "intbrainlab", "international"
ANATOMY_CSV = Path(__file__).resolve().parent.parent / "media" / "anatomy.csv"
MANIFEST_FIELDS = ["pid", "eid", "probe", "status", "reason", "n_units", "n_trials",
                   "settings", "updated"]


@dataclass
class PrepConfig:
    """Everything that decides the content of a file; its hash names a preparation."""
    regions: tuple = ("root",)  # Allen acronyms with all their descendants (media/anatomy.csv);
    # "root" is the whole brain, so the default keeps every good unit not outside it ("void")
    align_event: str = "stimOn_times"  # trials-table column the windows are aligned to
    t_before: float = 0.2  # seconds of window before the event
    t_after: float = 0.8  # seconds after it; bins = (t_before + t_after) / bin_size
    bin_size: float = 0.01  # seconds per bin (10 ms, as in Pandarinath et al. 2018)
    min_rt: float = 0.08  # BWM reaction-time filter, firstMovement - stimOn, in seconds ...
    max_rt: float = 2.0  # ... (defaults of load_trials_and_mask, brainwidemap/bwm_loading.py)
    nan_events: tuple = ("stimOn_times", "choice", "feedback_times", "probabilityLeft",
                         "firstMovement_times", "feedbackType")  # BWM: NaN in any drops a trial
    heldout_frac: float = 0.25  # share of units held out (NLB MC_Maze: 45 of 182 ~ 0.25)
    valid_frac: float = 0.2  # share of trials in the validation split
    seed: int = 0  # for the trial split and the held-out units
    min_units: int = 10  # fewer good units in the regions: skip the insertion
    min_trials: int = 50  # fewer trials after the filters: skip the insertion
    tag: str = "2024_Q2_IBL_et_al_BWM_iblsort"  # Alyx dataset tag of the BWM release
    revision: str = "2024-05-06"  # spike-sorting revision of that release
    spike_sorter: str = "iblsorter"  # collection alf/<probe>/<spike_sorter>

    @property
    def n_bins(self) -> int:
        if self.bin_size <= 0:
            raise ValueError(f"--bin-size {self.bin_size:g}: must be above 0")
        n = (self.t_before + self.t_after) / self.bin_size
        if abs(n - round(n)) > 1e-6 or round(n) < 1:
            raise ValueError(f"--window {-self.t_before:g} {self.t_after:g} is not a whole "
                             f"number of --bin-size {self.bin_size:g} bins")
        return int(round(n))

    def settings(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    def settings_hash(self) -> str:
        blob = json.dumps(self.settings(), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


class Skip(Exception):
    """A property of the data (too few units or trials): the same settings skip it again."""


# ---------------------------------------------------------------------------------------------
# brain regions


def export_anatomy(path) -> int:
    """Write iblatlas's Allen region table (non-lateralised ids) to `path`; return its rows."""
    from iblatlas.regions import BrainRegions

    df = BrainRegions().to_df()
    df = df[df["id"] >= 0]  # iblatlas adds left-hemisphere copies with negative ids
    df = df.assign(parent=df["parent"].astype("Int64"))[
        ["id", "acronym", "name", "parent", "level", "order", "hexcolor"]]
    tmp = Path(f"{path}.tmp{os.getpid()}")
    try:
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(df)


def load_anatomy(path=ANATOMY_CSV) -> dict:
    """id -> (acronym, parent id or None), from the CSV written by export_anatomy."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no region table; write it with `python -m "
                                f"src.prep_data --export-anatomy {path}`")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"id", "acronym", "parent"} <= set(rows[0]):
        raise ValueError(f"{path}: expected columns id, acronym, parent")
    return {int(r["id"]): (r["acronym"], int(r["parent"]) if r["parent"] else None)
            for r in rows}


def region_ids(anatomy: dict, acronyms) -> np.ndarray:
    """Ids of the regions named by `acronyms` and of all their descendants."""
    by_acronym = {a: i for i, (a, _) in anatomy.items()}
    children = {}
    for i, (_, parent) in anatomy.items():
        children.setdefault(parent, []).append(i)
    found, todo = set(), []
    for a in acronyms:
        if a not in by_acronym:
            close = difflib.get_close_matches(a, by_acronym, n=3)
            raise ValueError(f"--regions: unknown acronym '{a}' (not in {ANATOMY_CSV.name})"
                             + (f"; did you mean {', '.join(close)}?" if close else ""))
        todo.append(by_acronym[a])
    while todo:
        i = todo.pop()
        if i not in found:
            found.add(i)
            todo.extend(children.get(i, []))
    return np.array(sorted(found), dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# trials and binning


def trial_mask(trials, cfg: PrepConfig) -> np.ndarray:
    """Trials that pass the brain-wide-map filters: no NaN in the key events (nor in the
    alignment event), reaction time firstMovement - stimOn within [min_rt, max_rt]."""
    need = sorted(set(cfg.nan_events) | {cfg.align_event, "stimOn_times", "firstMovement_times"})
    missing = [c for c in need if c not in trials.columns]
    if missing:
        raise KeyError(f"trials table has no column(s) {', '.join(missing)} "
                       f"(it has: {', '.join(trials.columns)})")
    ok = trials[need].notna().all(axis=1).to_numpy()
    rt = (trials["firstMovement_times"] - trials["stimOn_times"]).to_numpy()
    with np.errstate(invalid="ignore"):
        ok &= (rt >= cfg.min_rt) & (rt <= cfg.max_rt)
    return ok


def bin_spikes(times, clusters, unit_ids, starts, n_bins: int, bin_size: float,
               chunk_spikes: int = 2_000_000, chunk_cells: int = 4_000_000) -> np.ndarray:
    """Spike counts (trials, n_bins, units) of units `unit_ids` in windows [start, start + n_bins
    * bin_size), column n counting cluster unit_ids[n].

    Time and memory scale with the spikes inside the windows, never with recording length x
    units: each window's spikes are found by binary search in the sorted spike times, and
    counted with one bincount on flat (trial, bin, unit) indices, a chunk of trials at a time
    (at most chunk_spikes spikes and chunk_cells output cells, so 16 + 32 MB of temporaries).
    """
    times = np.asarray(times)
    clusters = np.asarray(clusters)
    starts = np.asarray(starts, dtype=np.float64)
    unit_ids = np.asarray(unit_ids, dtype=np.int64)
    if times.size > 1 and np.any(times[1:] < times[:-1]):  # ALF spikes.times are sorted; be safe
        order = np.argsort(times, kind="stable")
        times, clusters = times[order], clusters[order]
    n_trials, n_units = starts.size, unit_ids.size
    column = np.full(max(int(clusters.max(initial=0)), int(unit_ids.max(initial=0))) + 1, -1,
                     dtype=np.int64)
    column[unit_ids] = np.arange(n_units)  # cluster id -> output column, -1 for other units
    lo = np.searchsorted(times, starts, side="left")
    hi = np.searchsorted(times, starts + n_bins * bin_size, side="left")
    counts = np.zeros((n_trials, n_bins, n_units), dtype=np.uint16)
    k0 = 0
    max_trials = max(1, chunk_cells // max(1, n_bins * n_units))
    while k0 < n_trials:
        n_in = np.cumsum(hi[k0:] - lo[k0:])
        k1 = k0 + max(1, int(np.searchsorted(n_in, chunk_spikes, side="right")))
        k1 = min(k1, k0 + max_trials, n_trials)
        per = hi[k0:k1] - lo[k0:k1]
        trial = np.repeat(np.arange(k1 - k0), per)
        idx = np.repeat(lo[k0:k1] - np.cumsum(per) + per, per) + np.arange(per.sum())
        col = column[clusters[idx]]
        keep = col >= 0
        trial, idx, col = trial[keep], idx[keep], col[keep]
        b = ((times[idx] - starts[k0 + trial]) / bin_size).astype(np.int64)
        np.clip(b, 0, n_bins - 1, out=b)  # a spike a rounding error inside the last edge
        flat = (trial * n_bins + b) * n_units + col
        chunk = np.bincount(flat, minlength=(k1 - k0) * n_bins * n_units)
        counts[k0:k1] = chunk.reshape(k1 - k0, n_bins, n_units)
        del chunk  # before the next bincount allocates its own
        k0 = k1
    return counts


def smallest_uint(a: np.ndarray):
    """The smallest unsigned integer dtype that holds every value of `a`."""
    top = int(a.max(initial=0))
    return next(t for t in (np.uint8, np.uint16, np.uint32) if top <= np.iinfo(t).max)


def split_trials(n: int, valid_frac: float, rng) -> tuple:
    n_valid = min(n - 1, max(1, int(round(valid_frac * n))))
    perm = rng.permutation(n)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


# ---------------------------------------------------------------------------------------------
# ONE


def connect(cache_dir=None, local=False, base_url=PUBLIC_URL, username=PUBLIC_USER,
            password=PUBLIC_PASSWORD):
    """A ONE instance: the public database by default, or an existing cache offline."""
    from one.api import ONE

    if local:
        if not cache_dir or not Path(cache_dir, "sessions.pqt").is_file():
            raise FileNotFoundError(f"--local needs --cache-dir with a ONE cache (sessions.pqt); "
                                    f"got {cache_dir}")
        return ONE(mode="local", cache_dir=str(cache_dir))
    return ONE(base_url=base_url, username=username, password=password, silent=True,
               cache_dir=str(cache_dir) if cache_dir else None)


def _insertions_table(one):
    """Local insertions table as rows of dicts (pid, eid, probe), empty if the cache has none.

    Read directly rather than via search_insertions: a plain local One has no public search
    over insertions, and OneAlyx's local search breaks under pandas 3 (see DESIGN.md)."""
    table = one._cache.get("insertions")
    if table is None or len(table) == 0:
        return []
    df = table.reset_index()
    return [{"pid": str(r["id"]), "eid": str(r["eid"]), "probe": r["name"]}
            for _, r in df.iterrows()]


def list_insertions(one, cfg: PrepConfig, pids=None) -> list:
    """Insertions to prepare: `pids`, or every insertion of the release tag (online) or of
    the local cache (offline: a cache downloaded for the tag holds only the tag's data)."""
    if one.offline:
        known = {r["pid"]: r for r in _insertions_table(one)}
        if not known:
            raise LookupError(f"the ONE cache in {one.cache_dir} has no insertions table "
                              "(insertions.pqt): cannot map probe ids to sessions offline")
        if pids is None:
            return sorted(known.values(), key=lambda r: r["pid"])
        unknown = [p for p in pids if p not in known]
        if unknown:
            raise LookupError(f"--pids: {', '.join(unknown)} not in the insertions table of "
                              f"{one.cache_dir}")
        return [known[p] for p in pids]
    if pids is not None:
        rows = []
        for p in pids:
            eid, probe = one.pid2eid(p)
            if eid is None:
                raise LookupError(f"--pids: no insertion {p} on {one.alyx.base_url}")
            rows.append({"pid": p, "eid": str(eid), "probe": probe})
        return rows
    records = one.alyx.rest("insertions", "list", django=f"datasets__tags__name,{cfg.tag}")
    rows = {r["id"]: {"pid": r["id"], "eid": r["session"], "probe": r["name"]} for r in records}
    return sorted(rows.values(), key=lambda r: r["pid"])


def load_units(one, eid: str, probe: str, cfg: PrepConfig):
    """The SpikeSortingLoader and its clusters merged with metrics and channel regions."""
    from brainbox.io.one import SpikeSortingLoader
    from iblatlas.regions import BrainRegions

    # the loader only needs atlas.regions to name channel regions; its default AllenAtlas
    # would download the Allen volumes
    atlas = types.SimpleNamespace(regions=BrainRegions())
    ssl = SpikeSortingLoader(one=one, eid=eid, pname=probe, atlas=atlas,
                             spike_sorter=cfg.spike_sorter)
    if not ssl.collections:
        raise FileNotFoundError(f"no spikes datasets for {eid} {probe} in alf/{probe}*")
    clusters = ssl.load_spike_sorting_object("clusters", revision=cfg.revision)
    channels = ssl.load_channels(revision=cfg.revision)
    clusters = SpikeSortingLoader.merge_clusters({}, clusters, channels)
    return ssl, clusters


def select_units(clusters, allowed_ids: np.ndarray) -> np.ndarray:
    """Cluster ids of good units (label == 1) whose channel lies in `allowed_ids`, by depth."""
    # channels carry Allen ids; iblatlas lateralises by sign (left hemisphere negative)
    in_region = np.isin(np.abs(np.asarray(clusters["atlas_id"])), allowed_ids)
    good = np.asarray(clusters["label"]) == 1
    ids = np.flatnonzero(good & in_region)
    return ids[np.argsort(np.asarray(clusters["depths"])[ids], kind="stable")]


def load_trials(one, eid: str):
    from brainbox.io.one import SessionLoader

    sl = SessionLoader(one=one, eid=eid)
    sl.load_trials()
    return sl.trials.reset_index(drop=True)


def load_spikes(one, ssl, cfg: PrepConfig):
    # only times and clusters: the loader's own spikes object also pulls amplitudes and
    # depths, as large again
    return one.load_object(ssl.eid, "spikes", collection=ssl.collection,
                           attribute=["times", "clusters"], revision=cfg.revision)


# ---------------------------------------------------------------------------------------------
# one insertion


def prepare(one, ins: dict, cfg: PrepConfig, allowed_ids: np.ndarray, out_path: Path) -> dict:
    """Load, select, bin, split and write one insertion; return the manifest numbers."""
    pid, eid, probe = ins["pid"], ins["eid"], ins["probe"]
    ssl, clusters = load_units(one, eid, probe, cfg)
    units = select_units(clusters, allowed_ids)
    need = max(cfg.min_units, 2)  # one held-in and one held-out unit at least
    if units.size < need:
        raise Skip(f"{units.size} good units in {' '.join(cfg.regions)}, fewer than {need} "
                   f"(--min-units {cfg.min_units})")
    trials = load_trials(one, eid)
    kept = np.flatnonzero(trial_mask(trials, cfg))
    need = max(cfg.min_trials, 2)  # one train and one valid trial at least
    if kept.size < need:
        raise Skip(f"{kept.size} of {len(trials)} trials pass the BWM filters, fewer than "
                   f"{need} (--min-trials {cfg.min_trials})")
    spikes = load_spikes(one, ssl, cfg)
    starts = trials[cfg.align_event].to_numpy()[kept] - cfg.t_before
    counts = bin_spikes(spikes["times"], spikes["clusters"], units, starts, cfg.n_bins,
                        cfg.bin_size)
    del spikes
    rng = np.random.default_rng(cfg.seed)
    train, valid = split_trials(kept.size, cfg.valid_frac, rng)
    n_out = min(int(round(cfg.heldout_frac * units.size)), units.size - 1)  # keep one held in
    heldout = np.zeros(units.size, dtype=bool)
    heldout[rng.choice(units.size, n_out, replace=False)] = True
    order = np.r_[np.flatnonzero(~heldout), np.flatnonzero(heldout)]  # each part by depth
    counts = counts[:, :, order]
    units = units[order]
    attrs = {"pid": pid, "eid": eid, "probe": probe, "revision": cfg.revision, "tag": cfg.tag,
             "collection": ssl.collection, "align_event": cfg.align_event,
             "t_before": cfg.t_before, "t_after": cfg.t_after, "bin_size": cfg.bin_size,
             "n_heldin": int((~heldout).sum()), "n_heldout": n_out,
             "regions": json.dumps(list(cfg.regions)), "settings": json.dumps(cfg.settings()),
             "settings_hash": cfg.settings_hash(), "session_ref": _session_ref(one, eid),
             "source": "IBL via ONE " + _origin(one), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_session(out_path, counts, train, valid, kept, units, clusters, trials, attrs)
    return {"n_units": int(units.size), "n_trials": int(kept.size)}


def _session_ref(one, eid):
    try:
        return str(one.eid2ref(eid, as_dict=False))
    except Exception:  # a nicety for people reading the file; never worth failing over
        return ""


def _origin(one):
    return f"cache {one.cache_dir}" if one.offline else one.alyx.base_url


def write_session(path: Path, counts, train, valid, kept, units, clusters, trials, attrs):
    """Write the session file in the DESIGN.md section 2 layout, atomically: a temporary name
    in the same folder, renamed when complete, removed on any error or Ctrl-C."""
    n_in = attrs["n_heldin"]
    dtype = smallest_uint(counts)
    gz = {"compression": "gzip", "compression_opts": 4}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            for split, rows in (("train", train), ("valid", valid)):
                c = counts[rows].astype(dtype)  # (trials, T, N), held-in columns first
                f.create_dataset(f"{split}_encod_data", data=c[:, :, :n_in], **gz)
                f.create_dataset(f"{split}_recon_data", data=c, **gz)
                f.create_dataset(f"{split}_inds", data=kept[rows])  # rows of the trials table
            f["cluster_ids"] = units
            f["cluster_uuids"] = np.asarray(clusters["uuids"], dtype=object)[units].astype("S36")
            f["acronyms"] = np.asarray(clusters["acronym"], dtype=object)[units].astype("S")
            f["atlas_ids"] = np.asarray(clusters["atlas_id"])[units]
            f["depths"] = np.asarray(clusters["depths"], dtype=np.float64)[units]  # um from tip
            f["trials_kept"] = kept
            g = f.create_group("trials")  # the whole session table: index it with *_inds
            for col in trials.columns:
                values = trials[col].to_numpy()
                if np.issubdtype(values.dtype, np.number):
                    g[col] = values.astype(np.float64)
            f.attrs.update(attrs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# manifest and the run


def read_manifest(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if "pid" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: not a manifest of this program (no 'pid' column); "
                             "move it away")
        return {r["pid"]: r for r in reader}


def update_manifest(path: Path, rows: dict):
    """Our rows over the manifest as it is on disk now: another run preparing into the same
    folder keeps the rows it wrote meanwhile."""
    write_manifest(path, {**read_manifest(path), **rows})


def write_manifest(path: Path, rows: dict):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
            w.writeheader()
            for pid in sorted(rows):
                w.writerow({k: rows[pid].get(k, "") for k in MANIFEST_FIELDS})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def prepared_hash(path: Path):
    """The settings hash of a complete session file at `path`, or None."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("settings_hash")
    except (OSError, KeyError):
        return None


def prepared_numbers(path: Path) -> dict:
    """The manifest's numbers of a complete session file, for a row that was lost."""
    with h5py.File(path, "r") as f:
        return {"n_units": int(f.attrs["n_heldin"] + f.attrs["n_heldout"]),
                "n_trials": len(f["trials_kept"])}


def run(one, cfg: PrepConfig, out_dir, pids=None, max_insertions=0, overwrite=False,
        anatomy_path=ANATOMY_CSV) -> dict:
    """Prepare every selected insertion; return the manifest rows of this run by pid."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.n_bins  # noqa: B018  (fail on a bad window before touching the network)
    allowed = region_ids(load_anatomy(anatomy_path), cfg.regions)
    todo = list_insertions(one, cfg, pids)
    if max_insertions > 0:
        todo = todo[:max_insertions]
    manifest_path = out_dir / "manifest.csv"
    manifest = read_manifest(manifest_path)
    h = cfg.settings_hash()
    done = {}
    bar = tqdm(todo, desc="insertions", unit="ins")
    for ins in bar:
        pid = ins["pid"]
        bar.set_postfix_str(pid[:8])
        out_path = out_dir / f"{pid}.h5"
        old = manifest.get(pid, {})
        row = {**ins, "settings": h}
        if not overwrite and prepared_hash(out_path) == h:
            kept = old.get("status") == "ok" and old.get("n_units")  # the row as it was
            numbers = ({k: old[k] for k in ("n_units", "n_trials")} if kept else
                       prepared_numbers(out_path))
            now = time.strftime("%Y-%m-%dT%H:%M:%S")
            done[pid] = {**row, **numbers, "status": "ok", "reason": "prepared",
                         "updated": old.get("updated", "") if kept else now}
            if any(str(done[pid].get(k, "")) != old.get(k, "") for k in MANIFEST_FIELDS):
                # a row lost (a kill between the file and its row) or edited comes back
                update_manifest(manifest_path, {pid: done[pid]})
            continue
        if not overwrite and old.get("status") == "skipped" and old.get("settings") == h:
            done[pid] = old
            continue
        try:
            row.update(prepare(one, ins, cfg, allowed, out_path), status="ok", reason="prepared")
        except Skip as e:
            row.update(status="skipped", reason=str(e))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # network, missing dataset, bad table: log it and go on
            row.update(status="failed", reason=f"{type(e).__name__}: {e}".replace("\n", " "))
        row["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        if row["status"] != "ok" and out_path.exists() and prepared_hash(out_path) != h:
            out_path.unlink()  # a file from other settings would pass for this preparation
        done[pid] = row
        update_manifest(manifest_path, {pid: row})
        if row["status"] != "ok":
            tqdm.write(f"{pid}: {row['status']}: {row['reason']}")
    counts = {s: sum(r["status"] == s for r in done.values()) for s in ("ok", "skipped", "failed")}
    tqdm.write(f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed; "
               f"see {manifest_path}")
    return done


def build_parser() -> argparse.ArgumentParser:
    d = PrepConfig()
    p = argparse.ArgumentParser(prog="python -m src.prep_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pids", nargs="+", help="probe insertion ids (default: the whole release)")
    p.add_argument("--regions", nargs="+", default=list(d.regions),
                   help=f"Allen acronyms, descendants included (default: {' '.join(d.regions)})")
    p.add_argument("--align", default=d.align_event,
                   help=f"trials event (default: {d.align_event})")
    p.add_argument("--window", nargs=2, type=float, metavar=("START", "END"),
                   default=[-d.t_before, d.t_after],
                   help=f"seconds around the event (default: {-d.t_before:g} {d.t_after:g})")
    p.add_argument("--bin-size", type=float, default=d.bin_size,
                   help="seconds (default: %(default)s)")
    p.add_argument("--heldout-frac", type=float, default=d.heldout_frac,
                   help="(default: %(default)s)")
    p.add_argument("--valid-frac", type=float, default=d.valid_frac, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--min-units", type=int, default=d.min_units, help="(default: %(default)s)")
    p.add_argument("--min-trials", type=int, default=d.min_trials, help="(default: %(default)s)")
    p.add_argument("--min-rt", type=float, default=d.min_rt, help="seconds (default: %(default)s)")
    p.add_argument("--max-rt", type=float, default=d.max_rt, help="seconds (default: %(default)s)")
    p.add_argument("--revision", default=d.revision, help="(default: %(default)s)")
    p.add_argument("--tag", default=d.tag, help="(default: %(default)s)")
    p.add_argument("--spike-sorter", default=d.spike_sorter, help="(default: %(default)s)")
    p.add_argument("--out-dir", default="data", help="(default: %(default)s)")
    p.add_argument("--max-insertions", type=int, default=0, help="stop after N (0: all)")
    p.add_argument("--overwrite", action="store_true", help="redo files already prepared")
    p.add_argument("--anatomy", default=str(ANATOMY_CSV), help="region table (media/anatomy.csv)")
    g = p.add_argument_group("connection (flags win over the environment variables)")
    g.add_argument("--cache-dir", default=os.environ.get("ONE_CACHE_DIR"),
                   help="ONE cache folder (env ONE_CACHE_DIR; default: ONE's own)")
    g.add_argument("--local", action="store_true", help="offline, on the cache in --cache-dir")
    g.add_argument("--base-url", default=os.environ.get("ALYX_BASE_URL", PUBLIC_URL),
                   help="Alyx database (env ALYX_BASE_URL; default: the public one)")
    g.add_argument("--username", default=os.environ.get("ALYX_USERNAME", PUBLIC_USER),
                   help="(env ALYX_USERNAME; default: the public account %(default)s)")
    g.add_argument("--password", default=os.environ.get("ALYX_PASSWORD", PUBLIC_PASSWORD),
                   help="(env ALYX_PASSWORD; default: the public account's)")
    p.add_argument("--export-anatomy", metavar="CSV",
                   help="write iblatlas's region table to CSV and exit")
    return p


def config_from_args(a) -> PrepConfig:
    return PrepConfig(regions=tuple(a.regions), align_event=a.align, t_before=-a.window[0],
                      t_after=a.window[1], bin_size=a.bin_size, min_rt=a.min_rt,
                      max_rt=a.max_rt, heldout_frac=a.heldout_frac, valid_frac=a.valid_frac,
                      seed=a.seed, min_units=a.min_units, min_trials=a.min_trials, tag=a.tag,
                      revision=a.revision, spike_sorter=a.spike_sorter)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    cfg = config_from_args(a)
    try:
        if a.export_anatomy:
            n = export_anatomy(a.export_anatomy)
            print(f"wrote {n} regions to {a.export_anatomy}")
            return 0
        if a.window[0] >= a.window[1]:
            raise ValueError(f"--window {a.window[0]:g} {a.window[1]:g}: START must be < END")
        if not 0 <= a.heldout_frac < 1:
            raise ValueError(f"--heldout-frac {a.heldout_frac:g}: must be at least 0 and below 1")
        if not 0 < a.valid_frac < 1:
            raise ValueError(f"--valid-frac {a.valid_frac:g}: must be above 0 and below 1")
        if a.max_insertions < 0:
            raise ValueError(f"--max-insertions {a.max_insertions}: must be 0 (all) or more")
        cfg.n_bins  # noqa: B018
        region_ids(load_anatomy(a.anatomy), cfg.regions)
        one = connect(a.cache_dir, a.local, a.base_url, a.username, a.password)
        run(one, cfg, a.out_dir, a.pids, a.max_insertions, a.overwrite, a.anatomy)
    except (ValueError, LookupError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConnectionError as e:  # what ONE raises when the database cannot be reached
        print(f"error: {' '.join(str(e).split()).rstrip('.')}. Nothing was written. To work "
              "offline, point --local --cache-dir at an existing ONE cache.", file=sys.stderr)
        return 2
    except OSError as e:  # an --out-dir that is a file, a folder that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
