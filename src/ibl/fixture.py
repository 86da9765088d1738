"""A small ONE cache laid out like the brain-wide-map release, for offline tests and the notebook,
and a stand-in for the Alyx web client that serves it as the public database would.

    from src.ibl.fixture import make_local_cache
    info = make_local_cache("/tmp/one_cache")      # then ONE(mode="local", cache_dir=...)

Paths. Session `main` is brain-wide-map session 8c33abef-3d3e-4d42-9f27-445e9def08f9
(angelakilab, NYU-21, 2020-08-13, number 2; probe00 is pid f475ae14-9415-453e-b800-1480ea1c868d,
probe01 is pid 8895f61f-1c17-4d2f-8b9b-77476c5261b6) with the dataset paths in SESSION_LISTING and
PROBE_LISTING below: the part of its listing on the public database that preparing it reads or
must pass by. The release's sorting in alf/<probe>/pykilosort/#2024-05-06#/, the older
unrevisioned files of the same sorter next to it, trials unrevisioned in alf/ and newer in
alf/#2025-03-03#/. An unrevisioned alf/<probe>/iblsorter/ (DECOY_LISTING, as some probes of the
release have) is added. tests/test_ibl_online.py checks the listings against the database.

Contents are synthetic, except the spike trains of main's probe00: the 120 s of real Neuropixels
spike times and cluster ids shipped inside ibllib (brainbox/tests/fixtures/ephys_test.p), plus
task-evoked spikes after stimulus onset so that the tutorial's PSTHs have something to show.
Cluster labels, depths, channel regions (CP, MOp5, MOs6a, MOs5, MOs2/3, MOs1, outside the brain)
and trials are made up. The older sorting and the decoy label the units the other way round
(good ones bad and the rest good), so reading either changes the units; the newer trials
revision repairs two trials, so reading it changes the trials kept.

Roles (insertions), each a way an insertion ends:
- `main`: prepared.
- `few_units`: main's probe01, too few good units in MOs (skipped).
- `no_spikes`: a session whose spike times were never uploaded (failed).
- `bad_trials`: good units, but a trials attribute one trial short, so that loading the trials
  fails inside ibllib (failed).
- `no_regions`: a probe outside the release whose channels carry no brain regions (skipped).
- `stale`: a sorting whose #2024-05-06# lacks clusters.uuids, which ONE then takes from the
  older unrevisioned files (failed: the revision check). Its session's trials exist only in a
  revision after 2024-07-10.
main, few_units, no_spikes and bad_trials carry the release tag (FakeAlyx lists them).

The trials follow the brain-wide-map paper's rules in a known way: a few trials with NaN events
or reaction times out of range, and performance on easy trials that drops at the end of the
session, so that the paper cuts it (FixtureInfo.kept, worked out here trial by trial). The
paper's aggregate trials table for these sessions is in bwm_tables/trials.pqt.

Identifiers of the other sessions are uuid3 hashes of their paths (as ONE makes for local
caches), so the same call builds the same cache.
"""

import datetime
import hashlib
import pickle
import re
import shutil
import types
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NAMESPACE = uuid.UUID("7d3c4a52-6f0e-4b8e-9b1c-2f6a1e0c9d11")  # arbitrary: makes ids stable
REVISION = "2024-05-06"  # spike sorting of the release
TRIALS_REVISION = "2024-07-10"  # trials as the paper loads them: the latest on or before this
NEWER_TRIALS_REVISION = "2025-03-03"
SORTER = "pykilosort"
DECOY_SORTER = "iblsorter"
TAG = "2024_Q2_IBL_et_al_BWM_iblsort"
N_CHANNELS = 384  # Neuropixels 1.0 sites
# depth bands along the probe (um from the tip) and their Allen acronyms, tip first
BANDS = [(0, 700, "CP"), (700, 1300, "MOp5"), (1300, 1800, "MOs6a"), (1800, 2600, "MOs5"),
         (2600, 3200, "MOs2/3"), (3200, 3600, "MOs1"), (3600, 3840, "void")]
MAIN = {"eid": "8c33abef-3d3e-4d42-9f27-445e9def08f9", "lab": "angelakilab", "subject": "NYU-21",
        "date": "2020-08-13", "number": 2,
        "pids": {"probe00": "f475ae14-9415-453e-b800-1480ea1c868d",
                 "probe01": "8895f61f-1c17-4d2f-8b9b-77476c5261b6"}}

SESSION_LISTING = """
alf/_ibl_trials.table.pqt
alf/_ibl_trials.goCueTrigger_times.npy
alf/_ibl_trials.stimOff_times.npy
alf/_ibl_trials.quiescencePeriod.npy
alf/#2025-03-03#/_ibl_trials.table.pqt
alf/_ibl_wheel.position.npy
alf/_ibl_wheel.timestamps.npy
alf/_ibl_wheelMoves.intervals.npy
alf/_ibl_wheelMoves.peakAmplitude.npy
""".split()
# per probe; the first block is the release's sorting, the second the older one it replaced
PROBE_LISTING = """
alf/{probe}/pykilosort/#2024-05-06#/channels.brainLocationIds_ccf_2017.npy
alf/{probe}/pykilosort/#2024-05-06#/channels.labels.npy
alf/{probe}/pykilosort/#2024-05-06#/channels.localCoordinates.npy
alf/{probe}/pykilosort/#2024-05-06#/channels.mlapdv.npy
alf/{probe}/pykilosort/#2024-05-06#/channels.rawInd.npy
alf/{probe}/pykilosort/#2024-05-06#/clusters.amps.npy
alf/{probe}/pykilosort/#2024-05-06#/clusters.channels.npy
alf/{probe}/pykilosort/#2024-05-06#/clusters.depths.npy
alf/{probe}/pykilosort/#2024-05-06#/clusters.metrics.pqt
alf/{probe}/pykilosort/#2024-05-06#/clusters.peakToTrough.npy
alf/{probe}/pykilosort/#2024-05-06#/clusters.uuids.csv
alf/{probe}/pykilosort/#2024-05-06#/clusters.waveforms.npy
alf/{probe}/pykilosort/#2024-05-06#/clusters.waveformsChannels.npy
alf/{probe}/pykilosort/#2024-05-06#/drift.times.npy
alf/{probe}/pykilosort/#2024-05-06#/drift.um.npy
alf/{probe}/pykilosort/#2024-05-06#/drift_depths.um.npy
alf/{probe}/pykilosort/#2024-05-06#/passingSpikes.table.pqt
alf/{probe}/pykilosort/#2024-05-06#/spikes.amps.npy
alf/{probe}/pykilosort/#2024-05-06#/spikes.clusters.npy
alf/{probe}/pykilosort/#2024-05-06#/spikes.depths.npy
alf/{probe}/pykilosort/#2024-05-06#/spikes.samples.npy
alf/{probe}/pykilosort/#2024-05-06#/spikes.templates.npy
alf/{probe}/pykilosort/#2024-05-06#/spikes.times.npy
alf/{probe}/pykilosort/#2024-05-06#/templates.amps.npy
alf/{probe}/pykilosort/#2024-05-06#/templates.waveforms.npy
alf/{probe}/pykilosort/#2024-05-06#/templates.waveformsChannels.npy
alf/{probe}/pykilosort/channels.brainLocationIds_ccf_2017.npy
alf/{probe}/pykilosort/channels.localCoordinates.npy
alf/{probe}/pykilosort/channels.mlapdv.npy
alf/{probe}/pykilosort/channels.rawInd.npy
alf/{probe}/pykilosort/clusters.channels.npy
alf/{probe}/pykilosort/clusters.depths.npy
alf/{probe}/pykilosort/clusters.metrics.pqt
alf/{probe}/pykilosort/clusters.uuids.csv
alf/{probe}/pykilosort/spikes.amps.npy
alf/{probe}/pykilosort/spikes.clusters.npy
alf/{probe}/pykilosort/spikes.depths.npy
alf/{probe}/pykilosort/spikes.times.npy
""".split()
DECOY_LISTING = [p.replace("pykilosort/#2024-05-06#", DECOY_SORTER) for p in PROBE_LISTING
                 if "#2024-05-06#" in p]


@dataclass
class FixtureInfo:
    cache_dir: Path
    pids: dict = field(default_factory=dict)  # role -> probe insertion id
    eids: dict = field(default_factory=dict)  # role -> session id
    probes: dict = field(default_factory=dict)  # role -> probe name
    session_paths: dict = field(default_factory=dict)  # role -> session folder
    release: list = field(default_factory=list)  # roles whose datasets carry the release tag
    kept: list = field(default_factory=list)  # trials the paper keeps, of every session's table
    n_pass: int = 0  # the paper's passing start: trials from the first kept at all
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


# ---------------------------------------------------------------------------------------------
# trials


def _trials(rng, n_trials):
    """An IBL trials table (the columns of _ibl_trials.table.pqt): a few trials the paper drops
    for NaN or reaction time, and easy trials mostly correct except near the end."""
    start = 2.0 + 1.9 * np.arange(n_trials)
    stim_on = start + 0.5 + rng.uniform(0, 0.1, n_trials)
    rt = rng.lognormal(np.log(0.35), 0.4, n_trials).clip(0.1, 1.5)
    side = rng.choice([-1, 1], n_trials)  # -1: stimulus on the left
    contrast = rng.choice([1.0, 0.25, 0.125, 0.0625, 0.0], n_trials)
    easy = contrast >= 0.5
    correct = rng.random(n_trials) < np.where(easy, 0.96, 0.75)
    correct[easy & (np.arange(n_trials) >= n_trials - 50)] = False  # a tired end
    # IBL codes a rightward choice (the correct one for a right stimulus) as -1
    # (brainbox/behavior/training.py: "choice == -1 means contrast on right hand side")
    choice = np.where(correct, -side, side).astype(float)
    rt[7], rt[11] = 0.05, 2.5  # outside the paper's reaction-time range 0.08-2 s
    move = stim_on + rt
    move[3] = np.nan
    response = move + 0.2
    response[3] = stim_on[3] + 0.6
    feedback = response + 0.001
    choice[15] = np.nan
    feedback[19] = np.nan
    return {
        "intervals_0": start, "intervals_1": start + 1.8,
        "goCue_times": stim_on + 0.0001, "stimOn_times": stim_on,
        "firstMovement_times": move, "response_times": response, "feedback_times": feedback,
        "contrastLeft": np.where(side == -1, contrast, np.nan),
        "contrastRight": np.where(side == 1, contrast, np.nan),
        "choice": choice, "feedbackType": np.where(correct, 1.0, -1.0),
        "rewardVolume": np.where(correct, 1.5, 0.0),
        "probabilityLeft": rng.choice([0.5, 0.2, 0.8], n_trials),
    }


def _paper_trials(table):
    """The trials the paper keeps, worked out one session length at a time as its
    load_trials_and_mask does: the longest start with more than 400 trials and over 90% correct
    on easy trials; in it, no NaN key event and a reaction time in [0.08, 2] s."""
    n_pass = 0
    for n in range(len(table["stimOn_times"]), 400, -1):
        contrast = np.nan_to_num(table["contrastRight"][:n]) - np.nan_to_num(
            table["contrastLeft"][:n])
        easy = np.abs(contrast * 100) >= 50
        if np.mean(table["feedbackType"][:n][easy] == 1) > 0.9:
            n_pass = n
            break
    kept = []
    for k in range(n_pass):
        events = [table[c][k] for c in ("stimOn_times", "choice", "feedback_times",
                                        "probabilityLeft", "firstMovement_times", "feedbackType")]
        rt = table["firstMovement_times"][k] - table["stimOn_times"][k]
        if all(np.isfinite(events)) and 0.08 <= rt <= 2:
            kept.append(k)
    return kept, n_pass


def _write_trials(ses, table, rng, revisions=("", NEWER_TRIALS_REVISION), short=False):
    """The trials table in each revision folder, and the attributes stored beside it once
    (with `short`, quiescencePeriod one trial short)."""
    import pandas as pd

    n = len(table["stimOn_times"])
    for rev in revisions:
        folder = ses / "alf" / (f"#{rev}#" if rev else "")
        t = dict(table)
        if rev == NEWER_TRIALS_REVISION:  # a later extraction repairs trials 3 and 15
            t["firstMovement_times"] = t["firstMovement_times"].copy()
            t["firstMovement_times"][3] = t["stimOn_times"][3] + 0.3
            t["choice"] = t["choice"].copy()
            t["choice"][15] = 1.0
        folder.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(t).to_parquet(folder / "_ibl_trials.table.pqt")
    if "" in revisions:
        alf = ses / "alf"
        np.save(alf / "_ibl_trials.goCueTrigger_times.npy", table["goCue_times"] - 0.0001)
        np.save(alf / "_ibl_trials.stimOff_times.npy", table["feedback_times"] + 1.0)
        np.save(alf / "_ibl_trials.quiescencePeriod.npy", rng.uniform(0.4, 0.7, n - short))
        t_wheel = np.arange(0, table["intervals_1"][-1], 0.01)
        np.save(alf / "_ibl_wheel.timestamps.npy", t_wheel)
        drift = np.cumsum(rng.normal(0, 1e-3, t_wheel.size))  # the mouse's small jiggles
        position = _wheel_position(t_wheel, table) + drift
        np.save(alf / "_ibl_wheel.position.npy", np.round(position / WHEEL_TICK) * WHEEL_TICK)
        np.save(alf / "_ibl_wheelMoves.intervals.npy", np.c_[table["goCue_times"],
                                                            table["response_times"]])
        np.save(alf / "_ibl_wheelMoves.peakAmplitude.npy", rng.normal(0, 0.2, n))


WHEEL_TURN = 0.28  # rad: the turn that brings the stimulus to the centre (35 visual degrees
#                    at 4 degrees per mm of a 31 mm wheel's rim)
WHEEL_TICK = 2 * np.pi / 4096  # rad: the rotary encoder's resolution (1024 lines, x4 decoding)


def _wheel_position(t, table) -> np.ndarray:
    """Wheel angle (rad, counter-clockwise positive, as the ALF wheel object) at times t: in each
    trial with a choice, one minimum-jerk turn of WHEEL_TURN from first movement to response,
    counter-clockwise for choice -1 and clockwise for 1 (ALF: choice -1 turns the wheel
    counter-clockwise)."""
    pos = np.zeros(t.size)
    for k in range(len(table["stimOn_times"])):
        t0, t1, c = table["firstMovement_times"][k], table["response_times"][k], table["choice"][k]
        if not (np.isfinite(t0) and np.isfinite(t1) and c in (-1, 1)):
            continue
        s = np.clip((t - t0) / (t1 - t0), 0, 1)
        pos += -c * WHEEL_TURN * (10 * s**3 - 15 * s**4 + 6 * s**5)  # minimum jerk, 0 -> 1
    return pos


# ---------------------------------------------------------------------------------------------
# spike sorting


def _evoked_spikes(rng, table, clusters, depths):
    """Task-evoked spikes: some units fire after stimulus onset, more for right stimuli."""
    tuned = np.flatnonzero(rng.random(clusters.size) < 0.4)
    times, ids = [], []
    for k, t0 in enumerate(table["stimOn_times"]):
        right = np.isfinite(table["contrastRight"][k])
        rates = (45.0 if right else 15.0) * (0.5 + depths[clusters[tuned]] / 3840)  # spikes/s
        n = rng.poisson(rates * 0.2)
        times.append(t0 + 0.05 + 0.2 * rng.random(n.sum()))
        ids.append(np.repeat(clusters[tuned], n))
    return np.concatenate(times), np.concatenate(ids)


def _channels(region_ids):
    axial = 20.0 * (np.arange(N_CHANNELS) // 2)  # um from the tip, two sites per row
    lateral = np.where(np.arange(N_CHANNELS) % 4 < 2, 11.0, 43.0)
    atlas = np.zeros(N_CHANNELS, dtype=np.int64)
    for lo, hi, acr in BANDS:
        atlas[(axial >= lo) & (axial < hi)] = region_ids[acr]
    mlapdv = np.c_[np.full(N_CHANNELS, -1200.0), np.full(N_CHANNELS, 1500.0), axial - 4000.0]
    return {"brainLocationIds_ccf_2017": atlas, "mlapdv": mlapdv,
            "localCoordinates": np.c_[lateral, axial], "rawInd": np.arange(N_CHANNELS),
            "labels": np.zeros(N_CHANNELS, dtype=np.int64)}, axial


def _clusters(rng, n, axial, good_share):
    chan = np.sort(rng.integers(0, N_CHANNELS, n))  # cluster 0 deepest, as after sorting
    depths = axial[chan] + rng.uniform(-5, 5, n)
    label = rng.choice([0.0, 1 / 3, 2 / 3], n)
    label[rng.random(n) < good_share] = 1.0  # clusters.metrics label: 1 = passes all 3 metrics
    uuids = [str(uuid.uuid3(NAMESPACE, f"cluster{n}-{i}-{rng.random()}")) for i in range(n)]
    metrics = {"cluster_id": np.arange(n), "label": label,
               "firing_rate": rng.gamma(2.0, 3.0, n), "amp_median": rng.uniform(5e-5, 3e-4, n)}
    return {"channels": chan, "depths": depths, "metrics": metrics, "uuids": uuids}


def _sorting_files(clusters, channels, spikes):
    """File name -> content of one sorting folder (see PROBE_LISTING)."""
    import pandas as pd

    n = len(clusters["channels"])
    rng = np.random.default_rng(n)
    files = {f"channels.{k}.npy": v for k, v in channels.items()}
    files.update({
        "clusters.amps.npy": rng.uniform(5e-5, 3e-4, n),
        "clusters.channels.npy": clusters["channels"],
        "clusters.depths.npy": clusters["depths"],
        "clusters.metrics.pqt": pd.DataFrame(clusters["metrics"]),
        "clusters.peakToTrough.npy": rng.uniform(0.2, 1.0, n),
        "clusters.uuids.csv": pd.DataFrame({"uuids": clusters["uuids"]}),
        "clusters.waveforms.npy": np.zeros((n, 2, 2), dtype=np.float32),
        "clusters.waveformsChannels.npy": np.zeros((n, 2), dtype=np.int64),
        "drift.times.npy": np.arange(0.0, 120.0, 2.0), "drift.um.npy": np.zeros(60),
        "drift_depths.um.npy": np.arange(0.0, 3840.0, 320.0),
        "templates.amps.npy": rng.uniform(5e-5, 3e-4, n),
        "templates.waveforms.npy": np.zeros((n, 2, 2), dtype=np.float32),
        "templates.waveformsChannels.npy": np.zeros((n, 2), dtype=np.int64),
    })
    if spikes is not None:
        times, ids = spikes
        order = np.argsort(times, kind="stable")
        times, ids = times[order], ids[order]
        s = {"times": times, "clusters": ids.astype(np.uint32),
             "amps": rng.uniform(5e-5, 3e-4, ids.size),
             "depths": (clusters["depths"][ids] + rng.normal(0, 8, ids.size)).astype(np.float32),
             "samples": np.round(times * 30_000).astype(np.int64),
             "templates": ids.astype(np.uint32)}
        files.update({f"spikes.{k}.npy": v for k, v in s.items()})
        # the spikes of label == 1 clusters only, as ibllib's spike-sorting task writes them
        good = (clusters["metrics"]["label"] == 1)[ids]
        files["passingSpikes.table.pqt"] = pd.DataFrame(
            {k: (v.astype(np.uint16) if k in ("clusters", "templates") else v)[good]
             for k, v in s.items()})
    return files


def _relabelled(clusters):
    """The same clusters labelled the other way round: good units bad and the others good."""
    metrics = dict(clusters["metrics"])
    metrics["label"] = np.where(metrics["label"] == 1, 0.0, 1.0)
    return {**clusters, "metrics": metrics}


def _write_sorting(ses, probe, clusters, channels, spikes, listing):
    """The files of `listing` (PROBE_LISTING paths for `probe`) that the sorting has: the
    release's content in pykilosort/#2024-05-06#, the relabelled one in older and decoy
    folders."""
    release = _sorting_files(clusters, channels, spikes)
    other = _sorting_files(_relabelled(clusters), channels, spikes)
    for rel in listing:
        rel = rel.format(probe=probe)
        name = rel.rsplit("/", 1)[1]
        content = (release if f"#{REVISION}#" in rel else other).get(name)
        if content is None:
            continue  # e.g. spikes of a sorting whose spike times were never uploaded
        path = ses / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".npy"):
            np.save(path, content)
        elif name.endswith(".pqt"):
            content.to_parquet(path)
        else:
            content.to_csv(path, index=False)


# ---------------------------------------------------------------------------------------------
# the cache


def _write_tables(root, sessions, insertions):
    """sessions.pqt, datasets.pqt and insertions.pqt, the tables ONE reads in local mode."""
    import pandas as pd
    from iblutil.io import parquet
    from one.alf.cache import QC_TYPE

    meta = {"date_created": datetime.datetime.now().isoformat(sep=" ", timespec="minutes"),
            "origin": "python-lfads fixture"}
    ses_rows, ds_rows = [], []
    for eid, s in sessions.items():
        ses_rows.append({"id": eid, "lab": s["lab"], "subject": s["subject"], "date": s["date"],
                         "number": s["number"], "projects": "ibl_neuropixel_brainwide_01",
                         "task_protocol": "_iblrig_tasks_ephysChoiceWorld6.4.2"})
        for rel_path, size, default in _datasets(root / s["rel"]):
            ds_rows.append({"eid": eid, "id": str(uuid.uuid3(NAMESPACE, f"{eid}/{rel_path}")),
                            "rel_path": rel_path, "file_size": size,
                            # no hash: ONE then checks sizes only; its md5 allocates 256 MB
                            # per file (iblutil.io.hashfile), seconds over a test run
                            "hash": None, "exists": True, "qc": "NOT_SET",
                            "default_revision": default})
    ses = pd.DataFrame(ses_rows).astype({"number": np.uint16})
    ds = pd.DataFrame(ds_rows).astype({"file_size": "UInt64", "qc": QC_TYPE})
    parquet.save(root / "sessions.pqt", ses, meta)
    parquet.save(root / "datasets.pqt", ds, meta)
    parquet.save(root / "insertions.pqt", pd.DataFrame(insertions), meta)


def _datasets(session_dir):
    """(relative path, size, default revision) of each file under a session folder: the
    default revision of a dataset is its latest (no revision sorts first)."""
    from one.alf.path import rel_path_parts

    files = sorted(p.relative_to(session_dir).as_posix() for p in session_dir.rglob("*.*"))
    latest = {}
    for rel in files:
        collection, revision, *name = rel_path_parts(rel, as_dict=False)
        key = (collection, tuple(name))
        latest[key] = max(latest.get(key, ""), revision or "")
    for rel in files:
        collection, revision, *name = rel_path_parts(rel, as_dict=False)
        default = (revision or "") == latest[(collection, tuple(name))]
        yield rel, (session_dir / rel).stat().st_size, default


def _write_aggregate(root, sessions_trials):
    """bwm_tables/trials.pqt: the paper's aggregate trials table for these sessions, one row
    per trial it keeps the session for (its passing start), with the bwm_include column."""
    import pandas as pd

    frames = []
    for eid, (table, kept, n_pass) in sessions_trials.items():
        df = pd.DataFrame(table).iloc[:n_pass]
        df.insert(0, "eid", eid)
        df["bwm_include"] = np.isin(np.arange(n_pass), kept)
        frames.append(df)
    (root / "bwm_tables").mkdir()
    pd.concat(frames, ignore_index=True).to_parquet(root / "bwm_tables" / "trials.pqt")


def make_local_cache(cache_dir, n_trials: int = 460, seed: int = 0) -> FixtureInfo:
    """Write the cache into `cache_dir` (created; must not hold another cache) and describe it.
    One long function on purpose: it lays out the sessions and probes of the fixture in order,
    case by case, as the tests read them."""
    root = Path(cache_dir)
    if (root / "sessions.pqt").exists():
        raise FileExistsError(f"{root} already holds a ONE cache (sessions.pqt)")
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels, axial = _channels(_region_ids({acr for *_, acr in BANDS}))
    info = FixtureInfo(cache_dir=root, n_trials=n_trials)
    sessions, insertions = {}, []

    def session(subject, date, eid=None, lab="fixturelab", number=1):
        rel = f"{lab}/Subjects/{subject}/{date}/{number:03d}"
        eid = eid or str(uuid.uuid3(NAMESPACE, rel))
        sessions[eid] = {"rel": rel, "lab": lab, "subject": subject, "number": number,
                         "date": datetime.date.fromisoformat(date)}
        return eid, root / rel

    def insertion(role, eid, probe, pid=None, release=True):
        pid = pid or str(uuid.uuid3(NAMESPACE, f"{eid}/{probe}"))
        insertions.append({"eid": eid, "id": pid, "name": probe, "model": "3B2",
                           "serial": f"1900{len(insertions):04d}"})
        info.pids[role], info.eids[role], info.probes[role] = pid, eid, probe
        info.session_paths[role] = root / sessions[eid]["rel"]
        if release:
            info.release.append(role)

    table = _trials(rng, n_trials)
    info.kept, info.n_pass = _paper_trials(table)
    assert 400 < info.n_pass < n_trials, "the fixture's session must be one the paper cuts"
    full = PROBE_LISTING + DECOY_LISTING
    release_only = [p for p in PROBE_LISTING if f"#{REVISION}#" in p]
    # main: the real session's layout; probe00 spikes from ephys_test.p plus task-evoked ones
    eid1, ses1 = session(MAIN["subject"], MAIN["date"], MAIN["eid"], MAIN["lab"], MAIN["number"])
    times, ids = _ephys_test_spikes()
    c1 = _clusters(rng, int(ids.max()) + 1, axial, good_share=0.45)
    ev_t, ev_id = _evoked_spikes(rng, table, np.unique(ids), c1["depths"])
    _write_sorting(ses1, "probe00", c1, channels, (np.r_[times, ev_t], np.r_[ids, ev_id]), full)
    insertion("main", eid1, "probe00", MAIN["pids"]["probe00"])
    # probe01: 40 clusters, few of them good in MOs
    c2 = _clusters(rng, 40, axial, good_share=0.0)
    c2["metrics"]["label"][np.flatnonzero((c2["depths"] >= 1300) & (c2["depths"] < 3600))[:4]] = 1
    sel = ids < 40
    _write_sorting(ses1, "probe01", c2, channels, (times[sel], ids[sel]), full)
    insertion("few_units", eid1, "probe01", MAIN["pids"]["probe01"])
    _write_trials(ses1, table, rng)
    # a session whose spike times were never uploaded
    eid2, ses2 = session("FX002", "2024-01-16")
    _write_sorting(ses2, "probe00", c1, channels, None, full)
    _write_trials(ses2, table, rng)
    insertion("no_spikes", eid2, "probe00")
    # good units, but trials that fail to load
    eid3, ses3 = session("FX003", "2024-01-17")
    _write_sorting(ses3, "probe00", c1, channels, (times, ids), release_only)
    _write_trials(ses3, table, rng, short=True)
    insertion("bad_trials", eid3, "probe00")
    # outside the release: channels without brain regions; and a sorting missing a file
    eid4, ses4 = session("FX004", "2024-01-18")
    no_regions = {k: v for k, v in channels.items() if k not in ("brainLocationIds_ccf_2017",
                                                                   "mlapdv")}
    _write_sorting(ses4, "probe00", c1, no_regions, (times, ids), release_only)
    insertion("no_regions", eid4, "probe00", release=False)
    _write_sorting(ses4, "probe01", c1, channels, (times, ids),
                   [p for p in PROBE_LISTING if not p.endswith(f"#{REVISION}#/clusters.uuids.csv")])
    insertion("stale", eid4, "probe01", release=False)
    _write_trials(ses4, table, rng, revisions=(NEWER_TRIALS_REVISION,))
    _write_tables(root, sessions, insertions)
    _write_aggregate(root, {eid: (table, info.kept, info.n_pass) for eid in (eid1, eid2)})
    return info


# ---------------------------------------------------------------------------------------------
# the database, online


class _Schemes(dict):
    """The REST schema's search fields of any endpoint, read as ONE < 3.4 reads them
    (schemes[endpoint]["list"]["fields"]) or as later ONE does (schemes.fields(...))."""

    def __missing__(self, endpoint):
        names = ("session", "name", "lab", "subject", "django")
        return {"list": {"fields": [{"name": n} for n in names]}}

    def fields(self, endpoint, action="list"):
        return self[endpoint][action]["fields"]


class FakeAlyx:
    """Stands in for one.webclient.AlyxClient, serving a fixture cache (the "server") as the
    public database would: the REST queries ONE makes while preparing (sessions, insertions)
    answered from its tables, and its files downloaded on request, each logged in `served`.
    The client's cache starts empty: ONE in remote mode fills it as it goes.

        monkeypatch.setattr(one.webclient, "AlyxClient", FakeAlyx.factory(info))
    """

    base_url = "https://alyx.fixture.test"
    data_server = "https://data.fixture.test"

    def __init__(self, server: FixtureInfo, cache_dir=None, **_):
        import pandas as pd

        if not cache_dir:
            raise ValueError("FakeAlyx needs cache_dir (the client's ONE cache)")
        self.server, self.cache_dir, self.silent = server, Path(cache_dir), True
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        root = Path(server.cache_dir)
        self._sessions = pd.read_parquet(root / "sessions.pqt").set_index("id")
        self._datasets = pd.read_parquet(root / "datasets.pqt")
        self._insertions = pd.read_parquet(root / "insertions.pqt")
        self._release = {server.pids[r] for r in server.release}
        self.served = []  # session-relative paths of the files downloaded, in order
        self.rest_schemes = _Schemes()

    @classmethod
    def factory(cls, server: FixtureInfo):
        """A replacement for the AlyxClient class that returns one shared FakeAlyx per cache."""
        made = {}

        def make(cache_dir=None, **kwargs):
            key = str(cache_dir)
            if key not in made:
                made[key] = cls(server, cache_dir=cache_dir, **kwargs)
            return made[key]

        make.instances = made
        return make

    def _session_path(self, eid):
        s = self._sessions.loc[eid]
        return f"{s['lab']}/Subjects/{s['subject']}/{s['date']}/{int(s['number']):03d}"

    def _session(self, eid, datasets=False):
        s = self._sessions.loc[eid]
        rec = {"id": eid, "url": f"{self.base_url}/sessions/{eid}", "subject": s["subject"],
               "start_time": f"{s['date']}T10:00:00", "lab": s["lab"], "number": int(s["number"]),
               "task_protocol": s["task_protocol"], "projects": s["projects"].split(",")}
        if datasets:
            rows = self._datasets[self._datasets["eid"] == eid]
            rec["data_dataset_session_related"] = [{
                "id": d["id"], "name": d["rel_path"].rsplit("/", 1)[1],
                "file_size": int(d["file_size"]), "hash": None, "qc": "NOT_SET",
                "default_revision": str(bool(d["default_revision"])),
                "data_url": self.rel_path2url(self._with_uuid(eid, d))} for _, d in rows.iterrows()]
        return rec

    def _with_uuid(self, eid, d):
        stem, ext = d["rel_path"].rsplit(".", 1)
        return f"{self._session_path(eid)}/{stem}.{d['id']}.{ext}"

    def _insertion(self, r):
        return {"id": r["id"], "session": r["eid"], "name": r["name"], "model": r["model"],
                "serial": r["serial"], "session_info": self._session(r["eid"])}

    def rest(self, url, action, id=None, **kwargs):
        import requests

        id = None if id is None else str(id)  # ONE passes UUID objects
        kwargs = {k: str(v) if isinstance(v, uuid.UUID) else v for k, v in kwargs.items()}
        if url == "sessions" and action == "read":
            return self._session(id, datasets=True)
        if url == "sessions" and action == "list":
            # by id, or by several: django="pk__in,('<eid>', ...)"
            eids = [id] if id else re.findall(r"[0-9a-f-]{36}", kwargs.get("django", ""))
            return [self._session(e) for e in eids if e in self._sessions.index]
        if url == "insertions" and action == "read":
            rows = self._insertions[self._insertions["id"] == id]
            if rows.empty:
                response = types.SimpleNamespace(status_code=404)
                raise requests.exceptions.HTTPError(f"404 insertion {id}", response=response)
            return self._insertion(rows.iloc[0])
        if url == "insertions" and action == "list":
            rows = self._insertions
            if kwargs.get("django", "").startswith("datasets__tags__name,"):
                tag = kwargs["django"].split(",", 1)[1]
                rows = rows[rows["id"].isin(self._release if tag == TAG else set())]
            if "session" in kwargs:
                rows = rows[rows["eid"] == kwargs["session"]]
            if "name" in kwargs:
                rows = rows[rows["name"] == kwargs["name"]]
            return [self._insertion(r) for _, r in rows.iterrows()]
        # e.g. the data repositories ONE asks for before trying AWS: it then falls back to
        # download_file, as it does for a database without AWS access
        raise ConnectionError(f"the fixture's Alyx has no {url} {action}")

    def rel_path2url(self, path):
        return f"{self.data_server}/{path}"

    def download_file(self, url, target_dir=None, return_md5=False, **_):
        from one.alf.path import remove_uuid_string

        urls, dirs = (url, target_dir) if isinstance(url, list) else ([url], [target_dir])
        paths, md5s = [], []
        for u, d in zip(urls, dirs):
            rel = str(remove_uuid_string(u[len(self.data_server) + 1:]))
            target = Path(d) / u.rsplit("/", 1)[1]  # with the uuid, as the real server names it
            shutil.copyfile(Path(self.server.cache_dir) / rel, target)
            self.served.append(rel.split("/", 5)[5])
            paths.append(target)
            md5s.append(hashlib.md5(target.read_bytes()).hexdigest())
        if not isinstance(url, list):
            paths, md5s = paths[0], md5s[0]
        return (paths, md5s) if return_md5 else paths

    def get(self, *args, **kwargs):
        raise ConnectionError("the fixture's Alyx serves no cache tables")


if __name__ == "__main__":
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "one_fixture_cache"
    i = make_local_cache(out)
    print(f"local ONE cache in {i.cache_dir}: insertions {i.pids}")
