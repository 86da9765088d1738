"""A small local ONE cache with real ALF names and layout, for offline tests and the notebook.

    from src.ibl_fixture import make_local_cache
    info = make_local_cache("/tmp/one_cache")      # then ONE(mode="local", cache_dir=...)

It holds three probe insertions in two sessions, laid out as the IBL public database serves
them (lab/Subjects/subject/date/number/collection/revision/object.attribute.ext), with the
cache tables ONE reads offline (sessions.pqt, datasets.pqt, insertions.pqt):

- `main`: spikes are the real 120 s of Neuropixels spike times and cluster ids shipped inside
  ibllib (brainbox/tests/fixtures/ephys_test.p), plus task-evoked spikes added after stimulus
  onset so that the tutorial's PSTHs have something to show; cluster labels, depths and channel
  brain regions (CP, MOp5, MOs6a, MOs5, MOs2/3, MOs1, outside the brain) are made up.
- `few_units`: the same session's second probe, with too few good units in MOs.
- `no_spikes`: a second session whose spike times were never uploaded (a missing dataset).

The spike sorting sits in alf/<probe>/iblsorter/#2024-05-06#/ (the brain-wide-map revision),
and a decoy *newer default* revision #2025-01-01# of clusters.metrics labels every unit bad:
code that forgets to ask for revision 2024-05-06 finds no good units.

Nothing here is real except the ephys_test.p spike trains; the ids are uuid3 hashes of the paths
(as ONE makes for local caches), so the same call builds the same cache.
"""

import datetime
import os
import pickle
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NAMESPACE = uuid.UUID("7d3c4a52-6f0e-4b8e-9b1c-2f6a1e0c9d11")  # arbitrary: makes ids stable
LAB = "fixturelab"
REVISION = "2024-05-06"
DECOY_REVISION = "2025-01-01"
SORTER = "iblsorter"
N_CHANNELS = 384  # Neuropixels 1.0 sites
# depth bands along the probe (um from the tip) and their Allen acronyms, tip first
BANDS = [(0, 700, "CP"), (700, 1300, "MOp5"), (1300, 1800, "MOs6a"), (1800, 2600, "MOs5"),
         (2600, 3200, "MOs2/3"), (3200, 3600, "MOs1"), (3600, 3840, "void")]


@dataclass
class FixtureInfo:
    cache_dir: Path
    pids: dict = field(default_factory=dict)  # role -> probe insertion id
    eids: dict = field(default_factory=dict)  # role -> session id
    probes: dict = field(default_factory=dict)  # role -> probe name
    session_paths: dict = field(default_factory=dict)  # role -> session folder
    bad_trials: list = field(default_factory=list)  # trial indices the BWM filters must drop
    n_trials: int = 0  # rows of each session's trials table


def _ephys_test_spikes():
    """Real spike times (s) and cluster ids from ibllib's test fixtures."""
    import brainbox  # from ibllib; never the unrelated PyPI package "brainbox"

    path = Path(brainbox.__file__).parent / "tests" / "fixtures" / "ephys_test.p"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: install the IBL stack (./setup.sh --ibl)")
    with open(path, "rb") as f:
        d = pickle.load(f)
    return d["spike_times"].astype(np.float64), d["spike_clusters"].astype(np.int64)


def _region_ids(acronyms):
    from iblatlas.regions import BrainRegions

    br = BrainRegions()
    return {a: int(br.acronym2id(a)[0]) for a in acronyms}


def _trials(rng, n_trials):
    """An IBL trials table (the columns of _ibl_trials.table.pqt) and the trials to drop."""
    start = 2.0 + 1.9 * np.arange(n_trials)
    stim_on = start + 0.5 + rng.uniform(0, 0.1, n_trials)
    rt = rng.lognormal(np.log(0.35), 0.4, n_trials).clip(0.1, 1.5)
    side = rng.choice([-1, 1], n_trials)  # -1: stimulus on the left
    contrast = rng.choice([1.0, 0.25, 0.125, 0.0625, 0.0], n_trials)
    correct = rng.random(n_trials) < 0.8
    # IBL codes a rightward choice (the correct one for a right stimulus) as -1
    # (brainbox/behavior/training.py: "choice == -1 means contrast on right hand side")
    choice = np.where(correct, -side, side).astype(float)
    bad = {3: "nan_move", 7: "fast", 11: "slow", 15: "nan_choice", 19: "nan_feedback"}
    rt[7], rt[11] = 0.05, 2.5  # outside the BWM reaction-time range 0.08-2 s
    move = stim_on + rt
    move[3] = np.nan
    response = move + 0.2
    response[3] = stim_on[3] + 0.6
    feedback = response + 0.001
    choice[15] = np.nan
    feedback[19] = np.nan
    table = {
        "intervals_0": start, "intervals_1": start + 1.8,
        "goCue_times": stim_on + 0.0001, "stimOn_times": stim_on,
        "firstMovement_times": move, "response_times": response, "feedback_times": feedback,
        "contrastLeft": np.where(side == -1, contrast, np.nan),
        "contrastRight": np.where(side == 1, contrast, np.nan),
        "choice": choice, "feedbackType": np.where(correct, 1.0, -1.0),
        "rewardVolume": np.where(correct, 1.5, 0.0),
        "probabilityLeft": rng.choice([0.5, 0.2, 0.8], n_trials),
    }
    return table, sorted(bad)


def _evoked_spikes(rng, table, clusters, depths):
    """Task-evoked spikes: some units fire after stimulus onset, more for right stimuli."""
    tuned = np.flatnonzero(rng.random(clusters.size) < 0.4)
    times, ids = [], []
    for k, t0 in enumerate(table["stimOn_times"]):
        right = np.isfinite(table["contrastRight"][k])
        for c in tuned:
            rate = (45.0 if right else 15.0) * (0.5 + depths[c] / 3840)  # spikes/s
            n = rng.poisson(rate * 0.2)
            times.append(t0 + 0.05 + 0.2 * rng.random(n))
            ids.append(np.full(n, clusters[c]))
    return np.concatenate(times), np.concatenate(ids)


def _channels(region_ids):
    axial = 20.0 * (np.arange(N_CHANNELS) // 2)  # um from the tip, two sites per row
    lateral = np.where(np.arange(N_CHANNELS) % 4 < 2, 11.0, 43.0)
    atlas = np.zeros(N_CHANNELS, dtype=np.int64)
    for lo, hi, acr in BANDS:
        atlas[(axial >= lo) & (axial < hi)] = region_ids[acr]
    mlapdv = np.c_[np.full(N_CHANNELS, -1200.0), np.full(N_CHANNELS, 1500.0), axial - 4000.0]
    return {"brainLocationIds_ccf_2017": atlas, "mlapdv": mlapdv,
            "localCoordinates": np.c_[lateral, axial], "rawInd": np.arange(N_CHANNELS)}, axial


def _clusters(rng, n, axial, good_share):
    chan = np.sort(rng.integers(0, N_CHANNELS, n))  # cluster 0 deepest, as after sorting
    depths = axial[chan] + rng.uniform(-5, 5, n)
    label = rng.choice([0.0, 1 / 3, 2 / 3], n)
    label[rng.random(n) < good_share] = 1.0  # clusters.metrics label: 1 = passes all 3 metrics
    uuids = [str(uuid.uuid3(NAMESPACE, f"cluster{n}-{i}-{rng.random()}")) for i in range(n)]
    metrics = {"cluster_id": np.arange(n), "label": label,
               "firing_rate": rng.gamma(2.0, 3.0, n), "amp_median": rng.uniform(5e-5, 3e-4, n)}
    return chan, depths, metrics, uuids


def _save_npy(folder, name, array):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / name, array)


def _write_probe(ses, probe, clusters, spikes):
    import pandas as pd

    alf = ses / "alf" / probe / SORTER / f"#{REVISION}#"
    chan, depths, metrics, uuids, channels = clusters
    for k, v in channels.items():
        _save_npy(alf, f"channels.{k}.npy", v)
    _save_npy(alf, "clusters.channels.npy", chan)
    _save_npy(alf, "clusters.depths.npy", depths)
    pd.DataFrame({"uuids": uuids}).to_csv(alf / "clusters.uuids.csv", index=False)
    pd.DataFrame(metrics).to_parquet(alf / "clusters.metrics.pqt")
    decoy = ses / "alf" / probe / SORTER / f"#{DECOY_REVISION}#"
    decoy.mkdir(parents=True)
    pd.DataFrame({**metrics, "label": np.zeros_like(metrics["label"])}).to_parquet(
        decoy / "clusters.metrics.pqt")
    if spikes is not None:
        times, ids = spikes
        order = np.argsort(times, kind="stable")
        times, ids = times[order], ids[order]
        rng = np.random.default_rng(ids.size)
        _save_npy(alf, "spikes.times.npy", times)
        _save_npy(alf, "spikes.clusters.npy", ids.astype(np.uint32))
        _save_npy(alf, "spikes.amps.npy", rng.uniform(5e-5, 3e-4, ids.size))
        _save_npy(alf, "spikes.depths.npy", (depths[ids] + rng.normal(0, 8, ids.size))
                  .astype(np.float32))


def _write_tables(root, sessions, insertions):
    """sessions.pqt, datasets.pqt and insertions.pqt, the tables ONE reads in local mode."""
    import pandas as pd
    from iblutil.io import parquet
    from one.alf.cache import QC_TYPE

    meta = {"date_created": datetime.datetime.now().isoformat(sep=" ", timespec="minutes"),
            "origin": "python-lfads fixture"}
    ses_rows, ds_rows = [], []
    for eid, (rel, subject, date) in sessions.items():
        ses_rows.append({"id": eid, "lab": LAB, "subject": subject, "date": date, "number": 1,
                         "task_protocol": "_iblrig_tasks_ephysChoiceWorld6.4.2",
                         "projects": "ibl_neuropixel_brainwide_01"})
        for f in sorted((root / rel).rglob("*.*")):
            rel_path = f.relative_to(root / rel).as_posix()
            ds_rows.append({"eid": eid, "id": str(uuid.uuid3(NAMESPACE, f"{eid}/{rel_path}")),
                            "rel_path": rel_path, "file_size": f.stat().st_size,
                            # no hash: ONE then checks sizes only; its md5 allocates 256 MB
                            # per file (iblutil.io.hashfile), seconds over a test run
                            "hash": None,
                            "exists": True, "qc": "NOT_SET",
                            # the decoy is the newest default; 2024-05-06 must be asked for
                            "default_revision": (DECOY_REVISION in rel_path
                                                 or "clusters.metrics" not in rel_path)})
    ses = pd.DataFrame(ses_rows).astype({"number": np.uint16})
    ds = pd.DataFrame(ds_rows).astype({"file_size": "UInt64", "qc": QC_TYPE})
    ins = pd.DataFrame(insertions)
    parquet.save(root / "sessions.pqt", ses, meta)
    parquet.save(root / "datasets.pqt", ds, meta)
    parquet.save(root / "insertions.pqt", ins, meta)


def make_local_cache(cache_dir, n_trials: int = 60, seed: int = 0) -> FixtureInfo:
    """Write the cache into `cache_dir` (created; must not hold another cache) and describe it."""
    root = Path(cache_dir)
    if (root / "sessions.pqt").exists():
        raise FileExistsError(f"{root} already holds a ONE cache (sessions.pqt)")
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    region_ids = _region_ids({acr for *_, acr in BANDS})
    channels, axial = _channels(region_ids)
    info = FixtureInfo(cache_dir=root, n_trials=n_trials)
    sessions, insertions = {}, []

    def session(subject, date):
        rel = f"{LAB}/Subjects/{subject}/{date}/001"
        eid = str(uuid.uuid3(NAMESPACE, rel))
        sessions[eid] = (rel, subject, datetime.date.fromisoformat(date))
        return eid, root / rel

    def insertion(role, eid, probe):
        pid = str(uuid.uuid3(NAMESPACE, f"{eid}/{probe}"))
        insertions.append({"eid": eid, "id": pid, "name": probe, "model": "3B2",
                           "serial": f"1900{len(insertions):04d}"})
        info.pids[role], info.eids[role], info.probes[role] = pid, eid, probe
        info.session_paths[role] = root / sessions[eid][0]

    table, info.bad_trials = _trials(rng, n_trials)
    import pandas as pd
    # session 1, probe00: real spike trains from ephys_test.p plus task-evoked spikes
    eid1, ses1 = session("FX001", "2024-01-15")
    times, ids = _ephys_test_spikes()
    n_clu = int(ids.max()) + 1
    chan, depths, metrics, uuids = _clusters(rng, n_clu, axial, good_share=0.45)
    ev_t, ev_id = _evoked_spikes(rng, table, np.unique(ids), depths)
    _write_probe(ses1, "probe00", (chan, depths, metrics, uuids, channels),
                 (np.r_[times, ev_t], np.r_[ids, ev_id]))
    insertion("main", eid1, "probe00")
    # session 1, probe01: 40 clusters, few of them good in MOs
    c2 = _clusters(rng, 40, axial, good_share=0.0)
    in_mos = np.flatnonzero((c2[1] >= 1300) & (c2[1] < 3600))[:4]
    c2[2]["label"][in_mos] = 1.0
    sel = ids < 40
    _write_probe(ses1, "probe01", (*c2, channels), (times[sel], ids[sel]))
    insertion("few_units", eid1, "probe01")
    pd.DataFrame(table).to_parquet(_mkdir(ses1 / "alf") / "_ibl_trials.table.pqt")
    # session 2, probe00: clusters and channels but the spike times are missing
    eid2, ses2 = session("FX002", "2024-01-16")
    _write_probe(ses2, "probe00", (chan, depths, metrics, uuids, channels), None)
    pd.DataFrame(table).to_parquet(_mkdir(ses2 / "alf") / "_ibl_trials.table.pqt")
    insertion("no_spikes", eid2, "probe00")
    _write_tables(root, sessions, insertions)
    return info


def _mkdir(p: Path) -> Path:
    os.makedirs(p, exist_ok=True)
    return p


if __name__ == "__main__":
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "one_fixture_cache"
    i = make_local_cache(out)
    print(f"local ONE cache in {i.cache_dir}: insertions {i.pids}")
