"""IBL Neuropixels recordings -> LFADS session files, one data/<pid>.h5 per probe insertion.

    python -m src.prep_data                                  # the whole release (large!)
    python -m src.prep_data --pids f475ae14-9415-453e-b800-1480ea1c868d
    python -m src.prep_data --regions MOs MOp --align stimOn_times --window -0.2 0.8 --bin-size 0.01
    python -m src.prep_data --local --cache-dir DIR          # offline, on an existing ONE cache
    python -m src.prep_data --export-anatomy media/anatomy.csv   # refresh the region table

The brain-wide-map data as its paper loads them (int-brain-lab/paper-brain-wide-map,
brainwidemap/bwm_loading.py), for each insertion of the release (tag
2024_Q2_IBL_et_al_BWM_iblsort):
  sorting  alf/<probe>/pykilosort, revision 2024-05-06; every file read is checked to come from
           exactly that collection and revision (a later alf/<probe>/iblsorter is never used)
  units    the good ones (clusters.metrics label == 1) whose channel lies in --regions or any
           of their descendants; their spikes come from the passing-spikes table (the spikes of
           good units only), not from the spikes of every cluster
  trials   the trials table at revision 2024-07-10 (the latest on or before that date); kept:
           no NaN in stimOn, choice, feedback, probabilityLeft, firstMovement, feedbackType;
           0.08 s <= firstMovement - stimOn <= 2 s (the paper drops < 0.08 and > 2); and, as the
           paper, a session must have more than 400 trials with over 90% correct on easy
           (contrast >= 50%) trials, else it is cut to the longest start that does or skipped.
           --trials-include bwm_include takes the paper's own column instead.
  wheel    alf/_ibl_wheel.position and .timestamps, the latest on or before the trials revision
           (as the paper's SessionLoader.load_wheel): velocity in rad/s, counter-clockwise
           positive, from brainbox's interpolate_position (1 kHz) and velocity_filtered (20 Hz
           low-pass), averaged over each bin: `{split}_behavior`. A wheel that cannot be loaded
           leaves the file without behaviour, and the manifest's reason says why.
Spikes of the kept units are counted in bins around a task event; trials are split into
train/valid and units into held-in/held-out. Every insertion gets a row in data/manifest.csv
(ok / skipped / failed, with the reason and the bytes downloaded); a rerun skips what is done.

A standalone script: it needs the `ibl` extra (ONE-api, ibllib, iblatlas) but nothing else of
this project, and in particular no torch. docs/ibl.md has the details.
"""

import argparse
import csv
import dataclasses
import difflib
import functools
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

from src.binning import bin_spikes, smallest_uint, split_trials

log = logging.getLogger("prep_data")

PUBLIC_URL = "https://openalyx.internationalbrainlab.org"
# the public read-only account, published by IBL in the ONE docs; ONE-api >= 3.6 no longer
# defaults the username, so it is passed explicitly
PUBLIC_USER, PUBLIC_PASSWORD = "intbrainlab", "international"
ANATOMY_CSV = Path(__file__).resolve().parents[2] / "media" / "anatomy.csv"
MANIFEST_FIELDS = ["pid", "eid", "probe", "status", "reason", "n_units", "n_trials",
                   "bytes_downloaded", "settings", "updated"]
# the brain-wide-map aggregate trials table (one row per trial of the paper's sessions, with its
# bwm_include column) and its md5, as the paper's bwm_loading.py downloads and checks it
BWM_TRIALS_TABLE = "aggregates/2024_Q2_IBL_et_al_BWM/trials.pqt"
BWM_TRIALS_MD5 = "067fb0e3d242ebeface361c42bdcf8c8"
# trials attributes as ibllib's SessionLoader reads them: itiDuration often has another length
TRIALS_ATTRIBUTES = r"(?!itiDuration).*"


@dataclass
class PrepConfig:
    """Everything that decides the content of a file; its hash names a preparation."""
    regions: tuple = ("root",)  # Allen acronyms with all their descendants (media/anatomy.csv);
    # "root" is the whole brain, so the default keeps every good unit not outside it ("void")
    align_event: str = "stimOn_times"  # trials-table column the windows are aligned to
    t_before: float = 0.2  # seconds of window before the event
    t_after: float = 0.8  # seconds after it; bins = (t_before + t_after) / bin_size
    bin_size: float = 0.01  # seconds per bin (10 ms, as in Pandarinath et al. 2018)
    min_rt: float = 0.08  # reaction time firstMovement - stimOn below this: trial dropped ...
    max_rt: float = 2.0  # ... above this too (defaults of the paper's load_trials_and_mask)
    nan_events: tuple = ("stimOn_times", "choice", "feedback_times", "probabilityLeft",
                         "firstMovement_times", "feedbackType")  # the paper: NaN in any drops it
    truncate_to_pass: bool = True  # the paper's session criterion: > 400 trials, > 90% correct
    # on easy trials; a session that fails is cut to the longest start that passes, or skipped
    trials_include: str = "filters"  # "filters": the rules above, computed here; "bwm_include":
    # the column of the paper's aggregate trials table (--trials-table)
    heldout_frac: float = 0.25  # share of units held out (NLB MC_Maze: 45 of 182 ~ 0.25)
    valid_frac: float = 0.2  # share of trials in the validation split
    seed: int = 0  # for the trial split and the held-out units
    min_units: int = 10  # fewer good units in the regions: skip the insertion
    min_trials: int = 50  # fewer trials kept: skip the insertion
    tag: str = "2024_Q2_IBL_et_al_BWM_iblsort"  # Alyx dataset tag of the brain-wide-map release
    spike_sorter: str = "pykilosort"  # the release's sorting: collection alf/<probe>/<this>
    revision: str = "2024-05-06"  # its revision; every spike-sorting file read must have it
    trials_revision: str = "2024-07-10"  # trials: the latest revision on or before this date
    # (the paper's MODIFIED_BEFORE); newer trials revisions exist
    wheel: bool = True  # bin the wheel's velocity (rad/s) like the spikes, as {split}_behavior

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


def _need_columns(trials, columns):
    missing = [c for c in columns if c not in trials.columns]
    if missing:
        raise KeyError(f"trials table has no column(s) {', '.join(missing)} "
                       f"(it has: {', '.join(trials.columns)})")


def passing_length(trials) -> int:
    """How many trials from the start of a session the paper keeps: all when there are more than
    400 and over 90% of the easy ones (|contrast| >= 50%) are correct, else the longest start
    that meets both (the paper drops trials from the end one at a time until it does), 0 when
    none does (load_trials_and_mask with truncate_to_pass, on ibllib's criterion_delay)."""
    _need_columns(trials, ["contrastLeft", "contrastRight", "feedbackType"])
    right = np.nan_to_num(trials["contrastRight"].to_numpy(dtype=float))
    left = np.nan_to_num(trials["contrastLeft"].to_numpy(dtype=float))
    easy = np.abs((right - left) * 100) >= 50
    n_easy = np.cumsum(easy)
    n_correct = np.cumsum(easy & (trials["feedbackType"].to_numpy() == 1))
    with np.errstate(invalid="ignore", divide="ignore"):  # no easy trial yet: 0/0 fails, as there
        passes = (np.arange(1, len(trials) + 1) > 400) & (n_correct / n_easy > 0.9)
    return int(np.flatnonzero(passes)[-1]) + 1 if passes.any() else 0


def trial_mask(trials, cfg: PrepConfig) -> np.ndarray:
    """Trials kept by the paper's rules: no NaN in cfg.nan_events; dropped when the reaction
    time firstMovement - stimOn is below min_rt or above max_rt (so both bounds are kept); with
    truncate_to_pass, only the session's passing start (passing_length). Also dropped: a NaN
    alignment event, which has no window to bin."""
    need = sorted(set(cfg.nan_events) | {cfg.align_event, "stimOn_times", "firstMovement_times"})
    _need_columns(trials, need)
    ok = trials[need].notna().all(axis=1).to_numpy().copy()  # pandas 3 hands out read-only
    rt = (trials["firstMovement_times"] - trials["stimOn_times"]).to_numpy()
    with np.errstate(invalid="ignore"):
        ok &= ~((rt < cfg.min_rt) | (rt > cfg.max_rt))
    if cfg.truncate_to_pass:
        ok[passing_length(trials):] = False
    return ok


def bwm_include_mask(trials, table, eid: str, cfg: PrepConfig) -> np.ndarray:
    """The paper's own choice of this session's trials: the bwm_include column of its aggregate
    trials table (one row per trial in session order; a session it cut has rows for its start
    only), on trials with a finite alignment event. The table's stimOn_times must match the
    loaded trials', else the two are different revisions of the session."""
    _need_columns(trials, ["stimOn_times", cfg.align_event])
    rows = table[table["eid"].astype(str) == str(eid)]
    if rows.empty:
        raise Skip(f"session {eid} is not in the aggregate trials table: not one of the paper's")
    n = len(rows)
    mine = trials["stimOn_times"].to_numpy(dtype=float)[:n]
    if n > len(trials) or not np.allclose(rows["stimOn_times"].to_numpy(dtype=float), mine,
                                          rtol=0, atol=1e-6, equal_nan=True):
        raise ValueError(f"the aggregate trials table ({n} rows) does not match the {len(trials)}"
                         f" trials loaded at --trials-revision {cfg.trials_revision} for {eid}")
    ok = np.zeros(len(trials), dtype=bool)
    ok[:n] = rows["bwm_include"].to_numpy(dtype=bool)
    return ok & trials[cfg.align_event].notna().to_numpy()


# ---------------------------------------------------------------------------------------------
# ONE


def tables_dir(cache_dir, tag: str) -> Path:
    """Where an offline cache keeps its tables: in the folder itself, or in <cache>/<tag>/, where
    ONE puts the tables of a release tag (one.load_cache(tag=...)); the one with an insertions
    table first."""
    found = [d for d in (Path(cache_dir), Path(cache_dir) / tag) if (d / "sessions.pqt").is_file()]
    if not found:
        raise FileNotFoundError(f"--local needs --cache-dir with a ONE cache: no sessions.pqt in "
                                f"{cache_dir} nor in {Path(cache_dir) / tag}")
    return next((d for d in found if (d / "insertions.pqt").is_file()), found[0])


def connect(cache_dir=None, local=False, base_url=PUBLIC_URL, username=PUBLIC_USER,
            password=PUBLIC_PASSWORD, tag=PrepConfig.tag):
    """A ONE instance: the public database by default, or an existing cache offline."""
    from one.api import ONE

    if local:
        if not cache_dir:
            raise FileNotFoundError("--local needs --cache-dir with a ONE cache (sessions.pqt)")
        tables = tables_dir(cache_dir, tag)
        return ONE(mode="local", cache_dir=str(cache_dir), tables_dir=str(tables))
    return ONE(base_url=base_url, username=username, password=password, silent=True,
               cache_dir=str(cache_dir) if cache_dir else None)


def save_cache(one):
    """Write what ONE learnt online (sessions, datasets, insertions) into the cache folder's
    tables: in remote mode ONE 3 keeps them in memory only, and --local needs them to reuse
    the downloads."""
    if one.offline or one._cache["datasets"].empty:
        return  # ONE 3.6 reads an empty datasets table back with a qc column it cannot filter
    from iblutil.io import parquet
    from one.alf.cache import cast_index_object

    for table, df in one._cache.items():
        path = Path(one.cache_dir) / f"{table}.pqt"
        if table not in ("_meta", "sessions", "datasets") and len(df) and not path.exists():
            # save_cache merges into the tables on disk, which always include sessions and
            # datasets, and fails on any other not there yet (the first insertions table):
            # start it empty
            stamp = time.strftime("%Y-%m-%d %H:%M")
            parquet.save(path, cast_index_object(df.iloc[0:0].copy(), str),
                         {"date_created": stamp, "origin": "python-lfads prep_data"})
    one.save_cache()
    for meta in one._cache["_meta"]["raw"].values():
        # save_cache leaves each table's origin a list, on which ONE's next update of the
        # table (which adds to it as a set) fails
        if isinstance(meta.get("origin"), list):
            meta["origin"] = set(meta["origin"])


def _insertions_table(one):
    """Local insertions table as rows of dicts (pid, eid, probe), empty if the cache has none.

    Read directly rather than via search_insertions: a plain local One has no public search
    over insertions, and OneAlyx's local search breaks under pandas 3."""
    table = one._cache.get("insertions")
    if table is None or len(table) == 0:
        return []
    df = table.reset_index()
    return [{"pid": str(r["id"]), "eid": str(r["eid"]), "probe": r["name"]}
            for _, r in df.iterrows()]


def list_insertions(one, cfg: PrepConfig, pids=None) -> list:
    """Insertions to prepare: `pids`, or every insertion of the release tag (online) or of
    the local cache (offline). Online, ONE records each in its insertions table, which
    save_cache writes for later offline runs."""
    if one.offline:
        known = {r["pid"]: r for r in _insertions_table(one)}
        if not known:
            raise LookupError(f"the ONE cache in {one.cache_dir} has no insertions table "
                              "(insertions.pqt): cannot map probe ids to sessions offline; an "
                              "online run with this --cache-dir writes it")
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
    # iterating the records fetches every page; ONE adds each page to its insertions table
    _, records = one.search_insertions(django=f"datasets__tags__name,{cfg.tag}", details=True)
    rows = {r["id"]: {"pid": r["id"], "eid": r["session"], "probe": r["name"]} for r in records}
    return sorted(rows.values(), key=lambda r: r["pid"])


def folder_bytes(folder) -> int:
    """Bytes of the files under `folder` (0 if there is none): a session folder of the ONE cache
    grows by what is downloaded into it."""
    if not folder or not Path(folder).is_dir():
        return 0
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def alf_parts(rel_path: str) -> tuple:
    """(collection, revision) of a path relative to its session: alf/probe00/pykilosort/
    #2024-05-06#/spikes.times.npy -> ("alf/probe00/pykilosort", "2024-05-06")."""
    folders = str(rel_path).split("/")[:-1]
    if folders and folders[-1].startswith("#") and folders[-1].endswith("#"):
        return "/".join(folders[:-1]), folders[-1][1:-1]
    return "/".join(folders), ""


def check_files(files, session_path, collection: str, revision: str) -> list:
    """The paths of `files` relative to the session, each checked to lie in `collection` at
    `revision`. ONE's revision= gives the latest on or before that date, and unrevisioned files
    sort before every date, so a file missing from the revision comes silently from an older
    sorting, and another collection's unrevisioned files would pass for it."""
    rels = []
    for f in files:
        rel = Path(f).relative_to(session_path).as_posix()
        found = alf_parts(rel)
        if found != (collection, revision):
            raise ValueError(f"{rel}: expected collection {collection} at revision {revision}, "
                             f"found {found[0]} at {found[1] or 'no revision'}")
        rels.append(rel)
    return rels


def _sorting(cfg: PrepConfig, probe: str) -> dict:
    """Keyword arguments that pin a spike-sorting query to the release's collection and
    revision (ibllib alone would fall back to another sorter's collection)."""
    return {"spike_sorter": cfg.spike_sorter, "collection": f"alf/{probe}/{cfg.spike_sorter}",
            "revision": cfg.revision}


def load_units(one, eid: str, probe: str, cfg: PrepConfig):
    """The SpikeSortingLoader, one entry per cluster (label and the other metrics, region,
    depth, uuid), and the files read, relative to the session."""
    from brainbox.io.one import SpikeSortingLoader
    from iblatlas.regions import BrainRegions

    # the loader only needs atlas.regions to name channel regions; its default AllenAtlas
    # would download the Allen volumes
    atlas = types.SimpleNamespace(regions=BrainRegions())
    ssl = SpikeSortingLoader(one=one, eid=eid, pname=probe, atlas=atlas,
                             spike_sorter=cfg.spike_sorter)
    where = _sorting(cfg, probe)
    if where["collection"] not in ssl.collections:
        found = ", ".join(ssl.collections) or "none"
        raise FileNotFoundError(f"no spikes datasets in {where['collection']} for {eid} "
                                f"(collections with spikes: {found})")
    clusters = ssl.load_spike_sorting_object("clusters", **where)
    require_regions(ssl, where)
    channels = ssl.load_channels(**where)
    files = [f for k in ("clusters", "channels") for f in ssl.files.get(k) or []]
    read = check_files(files, ssl.session_path, where["collection"], cfg.revision)
    # channel locations of the probe itself (alf/<probe>/electrodeSites), if any, win over the
    # sorting's in ibllib; they belong to no sorting
    read += [Path(f).relative_to(ssl.session_path).as_posix()
             for f in ssl.files.get("electrodeSites") or []]
    return ssl, merge_units(clusters, channels, f"{eid} {where['collection']}"), read


def require_regions(ssl, where: dict):
    """Skip, with the reason, a probe whose channels carry no brain regions on file: ibllib
    would rebuild them from the histology track, which needs the whole Allen atlas (and the
    database), not the region table the loader is given here."""
    ssl.download_spike_sorting_object("channels", missing="ignore", **where)
    ssl.download_spike_sorting_object("electrodeSites", missing="ignore",
                                      **{**where, "collection": f"alf/{ssl.pname}"})
    names = [Path(f).name for k in ("channels", "electrodeSites") for f in ssl.files.get(k) or []]
    if not any(".brainLocationIds_ccf_2017." in n for n in names):
        raise Skip(f"no channels.brainLocationIds_ccf_2017 in {where['collection']} (revision "
                   f"{where['revision']}): the probe's brain regions are not on file")


def merge_units(clusters, channels, where: str) -> dict:
    """One entry per cluster: the clusters.metrics columns (label, firing_rate, ...) by
    cluster_id, and the region of each cluster's channel. Merged here: ibllib's
    SpikeSortingLoader.merge_clusters without spikes returns None up to 4.0.1 and raises from
    4.1 when metrics are missing."""
    import pandas as pd

    for key in ("channels", "depths", "metrics", "uuids"):
        if key not in clusters:
            raise KeyError(f"{where}: no clusters.{key} dataset")
    n = len(clusters["channels"])
    metrics = pd.DataFrame(clusters["metrics"])
    ids = metrics["cluster_id"].to_numpy() if "cluster_id" in metrics else np.arange(len(metrics))
    if "label" not in metrics or not np.array_equal(np.sort(ids), np.arange(n)):
        raise ValueError(f"{where}: clusters.metrics must have a label for each of the {n} "
                         f"clusters (it has {len(metrics)} rows, columns {list(metrics)})")
    order = np.argsort(ids)
    units = {k: metrics[k].to_numpy()[order] for k in metrics.columns if k != "cluster_id"}
    chan = np.asarray(clusters["channels"], dtype=np.int64)
    units["atlas_id"] = np.asarray(channels["atlas_id"])[chan]
    units["acronym"] = np.asarray(channels["acronym"])[chan]
    units["channels"] = chan
    units["depths"] = np.asarray(clusters["depths"], dtype=np.float64)
    uuids = clusters["uuids"]  # a table (clusters.uuids.csv) with one column
    units["uuids"] = np.asarray(uuids["uuids"] if hasattr(uuids, "columns") else uuids, dtype=str)
    return units


def select_units(units: dict, allowed_ids: np.ndarray) -> np.ndarray:
    """Cluster ids of good units (label == 1) whose channel lies in `allowed_ids`, by depth."""
    # channels carry Allen ids; iblatlas lateralises by sign (left hemisphere negative)
    in_region = np.isin(np.abs(np.asarray(units["atlas_id"])), allowed_ids)
    good = np.asarray(units["label"]) == 1
    ids = np.flatnonzero(good & in_region)
    return ids[np.argsort(np.asarray(units["depths"])[ids], kind="stable")]


def trials_collection(one, eid: str) -> str:
    """The collection of the session's trials table ("alf" in the release)."""
    found = {alf_parts(p)[0] for p in one.list_datasets(eid, "_ibl_trials.table.pqt")}
    if len(found) > 1:
        raise ValueError(f"{eid}: trials tables in several collections ({', '.join(found)})")
    return found.pop() if found else "alf"


def load_trials(one, eid: str, cfg: PrepConfig):
    """The session's trials table at cfg.trials_revision (the latest on or before it), loaded
    as the paper does (ibllib's SessionLoader with a revision), and the files it came from."""
    from brainbox.io.one import SessionLoader
    from one.alf.exceptions import ALFObjectNotFound

    collection = trials_collection(one, eid)
    wildcards = one.wildcards
    try:
        sl = SessionLoader(one=one, eid=eid, revision=cfg.trials_revision)
        try:
            sl.load_trials(collection=collection)
        except ALFObjectNotFound as e:
            found = one.list_datasets(eid, "_ibl_trials.table.pqt") or ["none"]
            raise FileNotFoundError(f"no trials in {collection} on or before --trials-revision "
                                    f"{cfg.trials_revision} (trials tables: "
                                    f"{', '.join(found)})") from e
        one.wildcards = False  # TRIALS_ATTRIBUTES is a regular expression, as in SessionLoader
        files = one.load_object(eid, "trials", collection=collection, attribute=TRIALS_ATTRIBUTES,
                                revision=cfg.trials_revision, download_only=True)
    finally:
        # load_trials turns ONE's wildcards off for its query and on again only when it
        # succeeds; left off, every later pattern (alf/probe00*, spikes*) is read as a regular
        # expression and matches nothing
        one.wildcards = wildcards
    rels = [Path(f).relative_to(sl.session_path).as_posix() for f in files]
    return sl.trials.reset_index(drop=True), rels


def keep_trials(trials, eid: str, cfg: PrepConfig, table=None) -> np.ndarray:
    """The trials kept: the paper's bwm_include column, or its rules computed here."""
    if cfg.trials_include == "bwm_include":
        return bwm_include_mask(trials, table, eid, cfg)
    if cfg.truncate_to_pass and passing_length(trials) == 0:
        raise Skip(f"{len(trials)} trials never reach the paper's session criterion (more than "
                   "400 trials, over 90% correct on easy trials); --no-truncate keeps them")
    return trial_mask(trials, cfg)


def open_trials_table(one, path=None):
    """The paper's aggregate trials table (eid, stimOn_times, bwm_include): `path`, else
    <ONE cache>/bwm_tables/trials.pqt, where the paper's download helper puts it (and where it
    is downloaded when online)."""
    import pandas as pd
    import pyarrow.parquet as pq

    target = Path(path) if path else Path(one.cache_dir) / "bwm_tables" / "trials.pqt"
    if not target.is_file():
        if path or one.offline:
            raise FileNotFoundError(f"--trials-include bwm_include: no aggregate trials table "
                                    f"{target}; an online run downloads it there, or give "
                                    "--trials-table")
        download_trials_table(one, target)
    columns = ["eid", "stimOn_times", "bwm_include"]
    missing = sorted(set(columns) - set(pq.read_schema(target).names))
    if missing:
        raise ValueError(f"{target}: not the paper's aggregate trials table (no column(s) "
                         f"{', '.join(missing)})")
    return pd.read_parquet(target, columns=columns)


def download_trials_table(one, target: Path) -> Path:
    """The paper's aggregate trials table from IBL's public bucket, as its bwm_loading.py
    fetches it, checked against the md5 the paper pins."""
    from iblutil.io import hashfile
    from one.remote import aws

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        s3, bucket = aws.get_s3_from_alyx(alyx=one.alyx)
        if aws.s3_download_file(BWM_TRIALS_TABLE, tmp, s3=s3, bucket_name=bucket,
                                overwrite=True) is None:
            raise FileNotFoundError(f"{BWM_TRIALS_TABLE} not found in the bucket {bucket}")
        if hashfile.md5(tmp) != BWM_TRIALS_MD5:
            raise ValueError(f"{BWM_TRIALS_TABLE}: md5 {hashfile.md5(tmp)}, not the paper's "
                             f"{BWM_TRIALS_MD5}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load_spikes(one, ssl, cfg: PrepConfig, good_ids, attributes=("times", "clusters")):
    """Spike `attributes` to bin good units with, and the files read. From the passing-spikes
    table, which holds the spikes of the good (label == 1) clusters `good_ids` only and is what
    the paper loads (load_spike_sorting with good_units=True): the same spikes for any good
    unit, far less to download than the spikes of every cluster. From the spikes object when
    a sorting has no such table."""
    import pandas as pd
    from one.alf.exceptions import ALFObjectNotFound
    from one.alf.io import load_object

    where = _sorting(cfg, ssl.pname)
    pin = {"collection": where["collection"], "revision": cfg.revision, "download_only": True}
    try:
        files = one.load_object(ssl.eid, "passingSpikes", **pin)
    except ALFObjectNotFound:
        files = one.load_object(ssl.eid, "spikes", attribute=list(attributes), **pin)
        rels = check_files(files, ssl.session_path, where["collection"], cfg.revision)
        spikes = load_object(files)
        return {k: np.asarray(spikes[k]) for k in attributes}, rels
    rels = check_files(files, ssl.session_path, where["collection"], cfg.revision)
    table = pd.read_parquet(files[0], columns=list(attributes))
    spikes = {k: table[k].to_numpy() for k in attributes}
    present = np.flatnonzero(np.bincount(spikes["clusters"].astype(np.int64)))
    if not np.isin(present, good_ids).all():
        raise ValueError(f"{rels[0]} holds spikes of clusters that are not good units "
                         f"(e.g. {present[~np.isin(present, good_ids)][:5].tolist()})")
    return spikes, rels


# ---------------------------------------------------------------------------------------------
# the wheel


def load_wheel(one, eid: str, cfg: PrepConfig) -> tuple:
    """The session's wheel.timestamps and wheel.position (collection alf, the latest on or
    before cfg.trials_revision, as SessionLoader.load_wheel reads them with the paper's
    revision), and the files read, relative to the session."""
    from one.alf.io import load_object

    files = one.load_object(eid, "wheel", collection="alf", revision=cfg.trials_revision,
                            attribute=["position", "timestamps"], download_only=True)
    wheel = load_object(files)
    t, pos = np.asarray(wheel["timestamps"], float), np.asarray(wheel["position"], float)
    if t.shape != pos.shape or t.ndim != 1 or t.size < 2:
        raise ValueError(f"wheel.timestamps {t.shape} and wheel.position {pos.shape} must be "
                         "two vectors of the same length")
    return t, pos, [Path(f).relative_to(one.eid2path(eid)).as_posix() for f in files]


def bin_wheel(timestamps, position, starts, n_bins: int, bin_size: float,
              fs: float = 1000.0) -> np.ndarray:
    """Wheel velocity in rad/s (trials, n_bins) in the windows [start, start + n_bins *
    bin_size): the position resampled at fs and differentiated after a 20 Hz low-pass filter
    (brainbox's interpolate_position and velocity_filtered, with the defaults of ibllib's
    SessionLoader.load_wheel), averaged over the samples in each bin."""
    from brainbox.behavior.wheel import interpolate_position, velocity_filtered

    pos, t = interpolate_position(timestamps, position, freq=fs)
    vel, _ = velocity_filtered(pos, fs)  # (samples,) rad/s
    edges = np.asarray(starts, float)[:, None] + bin_size * np.arange(n_bins + 1)  # (trials, T+1)
    if edges.min() < t[0] or edges.max() > t[-1]:
        raise ValueError(f"the wheel covers {t[0]:.1f}-{t[-1]:.1f} s, not every trial's window "
                         f"({edges.min():.1f}-{edges.max():.1f} s)")
    idx = np.searchsorted(t, edges)  # first sample at or after each edge
    csum = np.r_[0.0, np.cumsum(vel)]
    n = np.diff(idx, axis=1)  # samples per bin
    if n.min() < 1:
        raise ValueError(f"bins of {bin_size:g} s hold no sample at {fs:g} Hz")
    return (csum[idx[:, 1:]] - csum[idx[:, :-1]]) / n


def wheel_behaviour(one, eid: str, starts, cfg: PrepConfig) -> tuple:
    """{"values": (trials, T, 1) rad/s, "names", "units"} for write_session and the files read,
    or (None, reason) when the wheel cannot be loaded or does not cover the windows."""
    try:
        t, pos, read = load_wheel(one, eid, cfg)
        vel = bin_wheel(t, pos, starts, cfg.n_bins, cfg.bin_size)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a missing or broken wheel costs the behaviour, not the insertion
        return None, f"no wheel: {type(e).__name__}: {e}".replace("\n", " ")
    return {"values": vel[:, :, None], "names": ["wheel_velocity"], "units": "rad/s"}, read


# ---------------------------------------------------------------------------------------------
# one insertion


def prepare(one, ins: dict, cfg: PrepConfig, allowed_ids: np.ndarray, out_path: Path,
            trials_table=None) -> dict:
    """Load, select, bin, split and write one insertion; return the manifest numbers."""
    pid, eid, probe = ins["pid"], ins["eid"], ins["probe"]
    ssl, units, read = load_units(one, eid, probe, cfg)
    chosen = select_units(units, allowed_ids)
    need = max(cfg.min_units, 2)  # one held-in and one held-out unit at least
    if chosen.size < need:
        raise Skip(f"{chosen.size} good units in {' '.join(cfg.regions)}, fewer than {need} "
                   f"(--min-units {cfg.min_units})")
    trials, trials_read = load_trials(one, eid, cfg)
    kept = np.flatnonzero(keep_trials(trials, eid, cfg, trials_table))
    need = max(cfg.min_trials, 2)  # one train and one valid trial at least
    if kept.size < need:
        raise Skip(f"{kept.size} of {len(trials)} trials kept ({cfg.trials_include}), fewer "
                   f"than {need} (--min-trials {cfg.min_trials})")
    spikes, spikes_read = load_spikes(one, ssl, cfg, np.flatnonzero(units["label"] == 1))
    starts = trials[cfg.align_event].to_numpy()[kept] - cfg.t_before
    counts = bin_spikes(spikes["times"], spikes["clusters"], chosen, starts, cfg.n_bins,
                        cfg.bin_size)
    del spikes
    behaviour, wheel_read = wheel_behaviour(one, eid, starts, cfg) if cfg.wheel else (None, [])
    rng = np.random.default_rng(cfg.seed)
    train, valid = split_trials(kept.size, cfg.valid_frac, rng)
    n_out = min(int(round(cfg.heldout_frac * chosen.size)), chosen.size - 1)  # keep one held in
    heldout = np.zeros(chosen.size, dtype=bool)
    heldout[rng.choice(chosen.size, n_out, replace=False)] = True
    order = np.r_[np.flatnonzero(~heldout), np.flatnonzero(heldout)]  # each part by depth
    counts = counts[:, :, order]
    chosen = chosen[order]
    attrs = {"pid": pid, "eid": eid, "probe": probe, "tag": cfg.tag,
             "collection": _sorting(cfg, probe)["collection"], "revision": cfg.revision,
             "trials_revision": cfg.trials_revision, "trials_include": cfg.trials_include,
             "datasets": json.dumps(read + trials_read + spikes_read +
                                    (wheel_read if behaviour else [])),
             "align_event": cfg.align_event,
             "t_before": cfg.t_before, "t_after": cfg.t_after, "bin_size": cfg.bin_size,
             "n_heldin": int((~heldout).sum()), "n_heldout": n_out,
             "regions": json.dumps(list(cfg.regions)), "settings": json.dumps(cfg.settings()),
             "settings_hash": cfg.settings_hash(), "session_ref": _session_ref(one, eid),
             "source": "IBL via ONE " + _origin(one), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_session(out_path, counts, train, valid, kept, chosen, units, trials, attrs, behaviour)
    note = "" if behaviour or not cfg.wheel else f"; {wheel_read}"  # why there is no wheel
    return {"n_units": int(chosen.size), "n_trials": int(kept.size), "reason": "prepared" + note}


def _session_ref(one, eid):
    try:
        return str(one.eid2ref(eid, as_dict=False))
    except Exception:  # a nicety for people reading the file; never worth failing over
        return ""


def _origin(one):
    return f"cache {one.cache_dir}" if one.offline else one.alyx.base_url


def write_session(path: Path, counts, train, valid, kept, chosen, units, trials, attrs,
                  behaviour=None):
    """Write the session file that src.main reads (README), atomically: a temporary name in
    the same folder, renamed when complete, removed on any error or Ctrl-C."""
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
                if behaviour:  # the NLB tools' per-bin behaviour: (trials, T, dims), names, units
                    b = f.create_dataset(f"{split}_behavior", data=behaviour["values"][rows]
                                         .astype(np.float32), **gz)
                    b.attrs.update(names=behaviour["names"], units=behaviour["units"])
            f["cluster_ids"] = chosen
            f["cluster_uuids"] = units["uuids"][chosen].astype("S36")
            f["acronyms"] = np.asarray(units["acronym"], dtype=str)[chosen].astype("S")
            f["atlas_ids"] = np.asarray(units["atlas_id"])[chosen]
            f["depths"] = units["depths"][chosen]  # um from the tip
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
        anatomy_path=ANATOMY_CSV, trials_table=None) -> dict:
    """Prepare every selected insertion; return the manifest rows of this run by pid."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.n_bins  # noqa: B018  (fail on a bad window before touching the network)
    allowed = region_ids(load_anatomy(anatomy_path), cfg.regions)
    table = open_trials_table(one, trials_table) if cfg.trials_include == "bwm_include" else None
    todo = list_insertions(one, cfg, pids)
    save_cache(one)
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
        out_path, old = out_dir / f"{pid}.h5", manifest.get(pid, {})
        if not overwrite and prepared_hash(out_path) == h:
            done[pid] = already_prepared(ins, old, out_path, h, manifest_path)
            continue
        if not overwrite and old.get("status") == "skipped" and old.get("settings") == h:
            done[pid] = old
            continue
        done[pid] = prepare_one(one, ins, cfg, allowed, out_path, table, h)
        update_manifest(manifest_path, {pid: done[pid]})
        if done[pid]["status"] != "ok":
            tqdm.write(f"{pid}: {done[pid]['status']}: {done[pid]['reason']}")
    counts = {s: sum(r["status"] == s for r in done.values()) for s in ("ok", "skipped", "failed")}
    tqdm.write(f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed; "
               f"see {manifest_path}")
    return done


def already_prepared(ins: dict, old: dict, out_path: Path, h: str, manifest_path: Path) -> dict:
    """The manifest row of a file prepared earlier with these settings; a row lost (a kill
    between the file and its row) or edited comes back."""
    kept = old.get("status") == "ok" and old.get("n_units")  # the row as it was
    numbers = ({k: old[k] for k in ("n_units", "n_trials")} if kept else
               prepared_numbers(out_path))
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    reason = old.get("reason", "") if kept else ""  # keep the note on a missing wheel
    row = {**ins, "settings": h, **numbers, "status": "ok",
           "reason": reason if reason.startswith("prepared") else "prepared",
           "bytes_downloaded": old.get("bytes_downloaded", "") if kept else "",
           "updated": old.get("updated", "") if kept else now}
    if any(str(row.get(k, "")) != old.get(k, "") for k in MANIFEST_FIELDS):
        update_manifest(manifest_path, {ins["pid"]: row})
    return row


def prepare_one(one, ins: dict, cfg, allowed, out_path: Path, table, h: str) -> dict:
    """Prepare one insertion; its manifest row: ok, skipped (a property of the data) or failed
    (network, a missing dataset: tried again on the next run)."""
    row = {**ins, "settings": h}
    session = _session_path(one, ins["eid"])
    before = folder_bytes(session)
    try:
        row.update({"status": "ok", "reason": "prepared",
                    **prepare(one, ins, cfg, allowed, out_path, table)})
    except Skip as e:
        row.update(status="skipped", reason=str(e))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # network, missing dataset, bad table: log it and go on
        row.update(status="failed", reason=f"{type(e).__name__}: {e}".replace("\n", " "))
    row["bytes_downloaded"] = folder_bytes(session) - before
    row["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    save_cache(one)
    if row["status"] != "ok" and out_path.exists() and prepared_hash(out_path) != h:
        out_path.unlink()  # a file from other settings would pass for this preparation
    return row


def _session_path(one, eid):
    try:
        return one.eid2path(eid)
    except Exception:  # only for counting downloads; loading the insertion reports the problem
        return None


def build_parser() -> argparse.ArgumentParser:
    """The flags, one add_argument each (a long function, but a flat list of flags)."""
    d = PrepConfig()
    p = parser_class()(prog="python -m src.prep_data", description=__doc__)
    p.add_argument("--pids", nargs="+", metavar="PID",
                   help="probe insertion ids (default: the whole release)")
    p.add_argument("--regions", nargs="+", default=list(d.regions), metavar="ACRONYM",
                   help=f"Allen acronyms, descendants included (default: {' '.join(d.regions)})")
    p.add_argument("--align", default=d.align_event, metavar="EVENT",
                   help=f"trials-table event the windows are aligned to (default: "
                        f"{d.align_event})")
    p.add_argument("--window", nargs=2, type=float, metavar=("START", "END"),
                   default=[-d.t_before, d.t_after],
                   help=f"seconds around the event (default: {-d.t_before:g} {d.t_after:g})")
    p.add_argument("--bin-size", type=float, default=d.bin_size, metavar="S",
                   help="seconds per bin (default: %(default)s)")
    p.add_argument("--heldout-frac", type=float, default=d.heldout_frac, metavar="F",
                   help="share of units held out (default: %(default)s)")
    p.add_argument("--valid-frac", type=float, default=d.valid_frac, metavar="F",
                   help="share of trials in the validation split (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, metavar="N",
                   help="for the trial split and the held-out units (default: %(default)s)")
    p.add_argument("--min-units", type=int, default=d.min_units, metavar="N",
                   help="fewer good units in the regions: the insertion is skipped "
                        "(default: %(default)s)")
    p.add_argument("--min-trials", type=int, default=d.min_trials, metavar="N",
                   help="fewer trials kept: the insertion is skipped (default: %(default)s)")
    p.add_argument("--min-rt", type=float, default=d.min_rt, metavar="S",
                   help="seconds; a shorter reaction time drops the trial (default: %(default)s)")
    p.add_argument("--max-rt", type=float, default=d.max_rt, metavar="S",
                   help="seconds; a longer one drops it too (default: %(default)s)")
    p.add_argument("--truncate", action=argparse.BooleanOptionalAction,
                   default=d.truncate_to_pass,
                   help="a session that fails the paper's criterion of more than 400 trials "
                        "with over 90%% correct on easy trials is cut to the longest start "
                        "that passes, or skipped, as the paper; --no-truncate keeps it whole "
                        "(default: --truncate)")
    p.add_argument("--trials-include", choices=("filters", "bwm_include"),
                   default=d.trials_include,
                   help="filters: the rules above, computed here; bwm_include: the column of the "
                        "paper's aggregate trials table (default: %(default)s)")
    p.add_argument("--trials-table", metavar="PQT",
                   help="the aggregate trials table for --trials-include bwm_include (default: "
                        "<cache>/bwm_tables/trials.pqt, downloaded there when online)")
    p.add_argument("--trials-revision", default=d.trials_revision, metavar="DATE",
                   help="trials: the latest revision on or before this date (default: "
                        "%(default)s, the paper's)")
    p.add_argument("--spike-sorter", default=d.spike_sorter, metavar="NAME",
                   help="sorting collection alf/<probe>/<this> (default: %(default)s, the "
                        "release's)")
    p.add_argument("--revision", default=d.revision, metavar="DATE",
                   help="spike-sorting revision; every file read must have it "
                        "(default: %(default)s)")
    p.add_argument("--tag", default=d.tag, metavar="TAG",
                   help="Alyx dataset tag of the release (default: %(default)s)")
    p.add_argument("--wheel", action=argparse.BooleanOptionalAction, default=d.wheel,
                   help="the wheel's velocity per bin, as {split}_behavior; --no-wheel leaves "
                        "it out (default: --wheel)")
    p.add_argument("--out-dir", default="data", metavar="DIR",
                   help="where the session files and manifest.csv go (default: %(default)s)")
    p.add_argument("--max-insertions", type=int, default=0, metavar="N",
                   help="stop after N insertions (default: 0, all)")
    p.add_argument("--overwrite", action="store_true", help="redo files already prepared")
    p.add_argument("--anatomy", default=str(ANATOMY_CSV), metavar="CSV",
                   help="the region table (default: media/anatomy.csv)")
    g = p.add_argument_group("connection (flags win over the environment variables)")
    g.add_argument("--cache-dir", default=os.environ.get("ONE_CACHE_DIR"), metavar="DIR",
                   help="ONE cache folder (env ONE_CACHE_DIR; default: ONE's own)")
    g.add_argument("--local", action="store_true", help="offline, on the cache in --cache-dir")
    g.add_argument("--base-url", default=os.environ.get("ALYX_BASE_URL", PUBLIC_URL),
                   metavar="URL", help="Alyx database (env ALYX_BASE_URL; default: the public "
                   "one)")
    g.add_argument("--username", default=os.environ.get("ALYX_USERNAME", PUBLIC_USER),
                   metavar="NAME", help="Alyx user (env ALYX_USERNAME; default: the public "
                   "account %(default)s)")
    g.add_argument("--password", default=os.environ.get("ALYX_PASSWORD", PUBLIC_PASSWORD),
                   metavar="PASSWORD", help="Alyx password (env ALYX_PASSWORD; default: the "
                   "public account's)")
    p.add_argument("--export-anatomy", metavar="CSV",
                   help="write iblatlas's region table to CSV and exit")
    return p


def parser_class():
    """src.utils.FlagParser (a misspelt flag is answered with the nearest one) where torch,
    which src.utils imports, is installed; else argparse without prefix abbreviations, as the
    preparation itself needs no torch."""
    try:
        from src.utils import FlagParser
    except ImportError:
        return functools.partial(argparse.ArgumentParser, allow_abbrev=False)
    return FlagParser


def config_from_args(a) -> PrepConfig:
    return PrepConfig(regions=tuple(a.regions), align_event=a.align, t_before=-a.window[0],
                      t_after=a.window[1], bin_size=a.bin_size, min_rt=a.min_rt,
                      max_rt=a.max_rt, heldout_frac=a.heldout_frac, valid_frac=a.valid_frac,
                      seed=a.seed, min_units=a.min_units, min_trials=a.min_trials, tag=a.tag,
                      revision=a.revision, spike_sorter=a.spike_sorter,
                      truncate_to_pass=a.truncate, trials_include=a.trials_include,
                      trials_revision=a.trials_revision, wheel=a.wheel)


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
        one = connect(a.cache_dir, a.local, a.base_url, a.username, a.password, cfg.tag)
        run(one, cfg, a.out_dir, a.pids, a.max_insertions, a.overwrite, a.anatomy,
            a.trials_table)
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
