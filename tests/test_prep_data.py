"""src/ibl/prep.py against the real ONE-api, brainbox and iblatlas code, offline.

A local ONE cache laid out like the brain-wide-map release (src/ibl/fixture.py: the release's
pykilosort/#2024-05-06# sorting, the older unrevisioned one, an iblsorter decoy, trials
unrevisioned and in a newer revision) is built once per module with HOME in a temporary folder,
since ONE writes under ~/.one and ~/Downloads. Expected values are computed independently: from
the ALF files read with numpy/pandas, iblatlas's own region tree, the fixture's own reading of
the paper's trial rules, and np.histogram per trial and unit. The online path (a stand-in
database) is tested in tests/test_prep_remote.py, the public database in tests/test_ibl_online.py.
"""

import json
import os
import pickle
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import brainbox  # from ibllib; the IBL stack is a test dependency (./setup.sh --dev)
import h5py
import numpy as np
import pandas as pd
import pytest
from brainbox.io.one import SpikeSortingLoader
from iblatlas.regions import BrainRegions

from src.ibl import prep
from src.ibl.fixture import REVISION, SORTER, TRIALS_REVISION, make_local_cache

ROOT = Path(__file__).resolve().parent.parent
EPHYS_TEST = Path(brainbox.__file__).parent / "tests" / "fixtures" / "ephys_test.p"
# a model small enough to train for a few steps in seconds
IBL_TINY_MODEL = ["--ic_enc_dim", "8", "--ci_enc_dim", "8", "--con_dim", "8", "--co_dim", "1",
                  "--ic_dim", "4", "--gen_dim", "16", "--fac_dim", "4", "--batch_size", "16",
                  "--n_samples", "2", "--threads", "1"]


def histogram_counts(times, clusters, unit_ids, starts, n_bins, bin_size):
    """The obvious, slow binning: one np.histogram per trial and unit."""
    out = np.zeros((len(starts), n_bins, len(unit_ids)), dtype=np.int64)
    by_unit = [times[clusters == u] for u in unit_ids]
    for k, s in enumerate(starts):
        edges = s + bin_size * np.arange(n_bins + 1)
        for n, t in enumerate(by_unit):
            out[k, :, n] = np.histogram(t, edges)[0]
    return out


@pytest.fixture(scope="module")
def ibl_cache(ibl_home, tmp_path_factory):
    return make_local_cache(tmp_path_factory.mktemp("one") / "cache")


def run_prep(cache, out_dir, *args):
    return prep.main(["--local", "--cache-dir", str(cache.cache_dir), "--out-dir", str(out_dir),
                      "--regions", "MOs", *args])


@pytest.fixture(scope="module")
def ibl_prepared(ibl_cache, tmp_path_factory):
    """The fixture cache prepared once with --regions MOs; the output folder."""
    out = tmp_path_factory.mktemp("data")
    assert run_prep(ibl_cache, out) == 0
    return out


def alf_dir(cache, role):
    """The release's sorting of a role's probe."""
    return cache.session_paths[role] / "alf" / cache.probes[role] / SORTER / f"#{REVISION}#"


def trials_table(cache, role):
    """The trials table the paper reads (revision 2024-07-10: the unrevisioned one)."""
    return pd.read_parquet(cache.session_paths[role] / "alf" / "_ibl_trials.table.pqt")


def manifest(out):
    return pd.read_csv(out / "manifest.csv").set_index("pid")


def file_attrs(out, cache, role="main"):
    with h5py.File(out / f"{cache.pids[role]}.h5", "r") as f:
        return dict(f.attrs)


# ---------------------------------------------------------------------------------------------
# pieces


def test_anatomy_csv_is_the_exported_iblatlas_table(tmp_path):
    fresh = tmp_path / "anatomy.csv"
    prep.export_anatomy(fresh)
    assert fresh.read_text() == prep.ANATOMY_CSV.read_text(), \
        "media/anatomy.csv is stale: python -m src.prep_data --export-anatomy media/anatomy.csv"


@pytest.mark.parametrize("acronyms", [["MOs"], ["MOs", "MOp"], ["CTX"], ["MOs5"]])
def test_regions_include_all_descendants(acronyms):
    br = BrainRegions()
    ids = np.concatenate([br.descendants(br.acronym2id(a))["id"] for a in acronyms])
    expected = np.unique(ids[ids > 0])
    got = prep.region_ids(prep.load_anatomy(), acronyms)
    np.testing.assert_array_equal(got, expected)
    if acronyms == ["MOs"]:
        assert set(br.id2acronym(got)) == {"MOs", "MOs1", "MOs2/3", "MOs5", "MOs6a", "MOs6b"}


def test_unknown_region_is_refused_with_a_suggestion(capsys):
    assert prep.main(["--regions", "MOss", "--local", "--cache-dir", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "unknown acronym 'MOss'" in err and "MOs" in err


def test_bad_window_is_refused(capsys):
    assert prep.main(["--window", "-0.2", "0.805", "--bin-size", "0.01"]) == 2
    assert "whole number" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--bin-size", "0"), ("--heldout-frac", "1"),
                                        ("--heldout-frac", "-0.5"), ("--valid-frac", "1.5"),
                                        ("--valid-frac", "0"), ("--max-insertions", "-1")])
def test_impossible_settings_are_refused_before_any_work(capsys, tmp_path, flag, value):
    out = tmp_path / "out"
    assert prep.main([flag, value, "--local", "--cache-dir", "/nonexistent",
                      "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err and "Traceback" not in err
    assert not out.exists()


def test_an_out_dir_that_is_a_file_is_refused(capsys, tmp_path, ibl_cache):
    (tmp_path / "f").write_text("not a folder")
    assert run_prep(ibl_cache, tmp_path / "f") == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_help_states_the_sorting_trials_revision_and_inclusion(capsys):
    with pytest.raises(SystemExit):
        prep.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fact in ("alf/<probe>/pykilosort, revision 2024-05-06", "revision 2024-07-10",
                 "0.08 s <= firstMovement - stimOn <= 2 s", "more than 400 trials",
                 "passing-spikes table", "bwm_include", "--trials-revision", "--no-truncate"):
        assert fact in text, fact


def test_binning_matches_histograms_on_ibllib_spikes():
    with open(EPHYS_TEST, "rb") as f:  # 120 s of real spikes shipped inside ibllib
        d = pickle.load(f)
    times, clusters = d["spike_times"], d["spike_clusters"]
    rng = np.random.default_rng(1)
    units = rng.choice(np.unique(clusters), 40, replace=False)  # scrambled column order
    # overlapping windows, one before the first spike and one past the last
    starts = np.r_[rng.uniform(0, 115, 30), -0.3, times[-1] - 0.1]
    expected = histogram_counts(times, clusters, units, starts, 50, 0.01)
    for spikes, cells in ((2_000_000, 4_000_000), (500, 4_000_000), (2_000_000, 10_000)):
        got = prep.bin_spikes(times, clusters, units, starts, 50, 0.01, chunk_spikes=spikes,
                              chunk_cells=cells)  # one chunk, many by spikes, many by cells
        np.testing.assert_array_equal(got, expected)
    assert expected.sum() > 1000  # the comparison covers real spikes


def test_binning_unsorted_spikes():
    rng = np.random.default_rng(2)
    times = rng.uniform(0, 10, 5000)
    clusters = rng.integers(0, 7, 5000)
    got = prep.bin_spikes(times, clusters, [6, 2], [1.0, 4.5], 20, 0.05)
    np.testing.assert_array_equal(got, histogram_counts(times, clusters, [6, 2], [1.0, 4.5],
                                                        20, 0.05))


def test_binning_memory_scales_with_spikes_not_recording_length():
    # 3 million spikes of 300 units over 3 hours: dense binning at 10 ms would need
    # 1.08e6 bins x 300 units (over 300 MB even as uint8)
    rng = np.random.default_rng(3)
    times = np.cumsum(rng.exponential(10_800 / 3e6, 3_000_000))
    clusters = rng.integers(0, 300, times.size).astype(np.uint32)
    starts = np.sort(rng.uniform(0, 10_700, 400))
    tracemalloc.start()
    t0 = time.perf_counter()
    counts = prep.bin_spikes(times, clusters, np.arange(300), starts, 100, 0.01)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert counts.shape == (400, 100, 300)
    lo, hi = np.searchsorted(times, starts), np.searchsorted(times, starts + 1.0)
    assert counts.sum() == (hi - lo).sum()  # every spike in a window counted once
    assert peak < 80e6, f"binning peaked at {peak / 1e6:.0f} MB"  # the output is 24 MB
    assert seconds < 5, f"binning took {seconds:.1f} s"


def test_trial_filters_follow_the_papers_rules():
    cfg = prep.PrepConfig(truncate_to_pass=False)
    trials = pd.DataFrame({
        "stimOn_times": [1.0, 2.0, 3.0, 4.0, 5.0, np.nan, 6.0],
        "firstMovement_times": [1.3, 2.05, 5.5, np.nan, 5.08, 6.3, 8.0],
        "feedback_times": [1.5, 2.5, 5.6, 4.8, 5.2, 6.5, 8.1],
        "choice": [1, -1, 1, 1, 1, 1, 1], "feedbackType": [1, 1, -1, 1, 1, 1, 1],
        "probabilityLeft": [0.5] * 7})
    # ok; reaction time 0.05 s; 2.5 s; NaN movement; 0.08 s and 2 s (the paper drops only
    # below and above them); NaN stimulus
    np.testing.assert_array_equal(prep.trial_mask(trials, cfg),
                                  [True, False, False, False, True, False, True])
    with pytest.raises(KeyError, match="feedbackType"):
        prep.trial_mask(trials.drop(columns="feedbackType"), cfg)


def papers_passing_length(trials):
    """The paper's loop, as its load_trials_and_mask runs it: whole session first, then one
    trial shorter at a time while more than 400 remain."""
    def passes(t):
        signed = np.diff(np.nan_to_num(np.c_[t["contrastLeft"], t["contrastRight"]])).ravel()
        easy = np.abs(signed * 100) >= 50
        with np.errstate(invalid="ignore"):
            perf = np.sum(t["feedbackType"].to_numpy()[easy] == 1) / easy.sum()
        return len(t) > 400 and perf > 0.9

    n = len(trials)
    if passes(trials):
        return n
    while n > 400:
        n -= 1
        if passes(trials.iloc[:n]):
            return n
    return 0


@pytest.mark.parametrize("n,p_easy,tired", [(600, 0.97, 0), (600, 0.97, 80), (350, 1.0, 0),
                                            (500, 0.8, 0), (450, 0.92, 40), (401, 0.95, 0)])
def test_the_session_criterion_is_the_papers(n, p_easy, tired):
    rng = np.random.default_rng(n + tired)
    contrast = rng.choice([1.0, 0.5, 0.25, 0.0], n)
    side = rng.choice([-1, 1], n)
    easy = contrast >= 0.5
    correct = rng.random(n) < np.where(easy, p_easy, 0.7)
    correct[easy & (np.arange(n) >= n - tired)] = False
    trials = pd.DataFrame({"contrastLeft": np.where(side < 0, contrast, np.nan),
                           "contrastRight": np.where(side > 0, contrast, np.nan),
                           "feedbackType": np.where(correct, 1.0, -1.0)})
    assert prep.passing_length(trials) == papers_passing_length(trials)


def test_merge_reads_metrics_by_cluster_id_and_names_what_is_missing():
    clusters = {"channels": np.array([5, 1, 2]), "depths": np.array([100.0, 20.0, 40.0]),
                "uuids": pd.DataFrame({"uuids": ["a", "b", "c"]}),
                "metrics": pd.DataFrame({"cluster_id": [2, 0, 1], "label": [1.0, 0.0, 1 / 3],
                                         "firing_rate": [3.0, 1.0, 2.0]})}
    channels = {"atlas_id": np.arange(10) * 10, "acronym": np.array(list("abcdefghij"))}
    units = prep.merge_units(clusters, channels, "here")
    np.testing.assert_array_equal(units["label"], [0.0, 1 / 3, 1.0])
    np.testing.assert_array_equal(units["firing_rate"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(units["atlas_id"], [50, 10, 20])
    assert list(units["acronym"]) == ["f", "b", "c"] and list(units["uuids"]) == ["a", "b", "c"]
    with pytest.raises(KeyError, match="here: no clusters.metrics"):
        prep.merge_units({k: v for k, v in clusters.items() if k != "metrics"}, channels, "here")
    with pytest.raises(ValueError, match="label for each of the 3 clusters"):
        prep.merge_units({**clusters, "metrics": clusters["metrics"].iloc[:2]}, channels, "x")


def test_alf_parts_split_collection_and_revision():
    assert prep.alf_parts("alf/probe00/pykilosort/#2024-05-06#/spikes.times.npy") == (
        "alf/probe00/pykilosort", "2024-05-06")
    assert prep.alf_parts("alf/probe00/iblsorter/spikes.times.npy") == ("alf/probe00/iblsorter",
                                                                        "")
    assert prep.alf_parts("alf/_ibl_trials.table.pqt") == ("alf", "")


# ---------------------------------------------------------------------------------------------
# the whole run on the local ONE cache


def test_manifest_records_every_insertion(ibl_prepared, ibl_cache):
    m = manifest(ibl_prepared)
    assert list(m.columns) == prep.MANIFEST_FIELDS[1:]
    status = {role: m.loc[pid, "status"] for role, pid in ibl_cache.pids.items()}
    assert status == {"main": "ok", "few_units": "skipped", "no_spikes": "failed",
                      "bad_trials": "failed", "no_regions": "skipped", "stale": "failed"}
    reason = {role: m.loc[pid, "reason"] for role, pid in ibl_cache.pids.items()}
    assert "4 good units in MOs" in reason["few_units"]
    assert "no spikes datasets in alf/probe00/pykilosort" in reason["no_spikes"]
    assert sorted(p.name for p in ibl_prepared.iterdir()) == sorted(
        ["manifest.csv", f"{ibl_cache.pids['main']}.h5"])  # no file for the others, no temp
    assert m.loc[ibl_cache.pids["main"], "n_trials"] == len(ibl_cache.kept)
    assert (m["bytes_downloaded"] == 0).all()  # offline: nothing to download
    assert (m["settings"] == m["settings"].iloc[0]).all()


def test_units_are_the_good_ones_in_the_regions_by_depth(ibl_prepared, ibl_cache):
    alf = alf_dir(ibl_cache, "main")
    label = pd.read_parquet(alf / "clusters.metrics.pqt")["label"].to_numpy()
    channel_region = np.load(alf / "channels.brainLocationIds_ccf_2017.npy")
    region = channel_region[np.load(alf / "clusters.channels.npy")]
    depths = np.load(alf / "clusters.depths.npy")
    uuids = pd.read_csv(alf / "clusters.uuids.csv")["uuids"].to_numpy()
    br = BrainRegions()
    mos = br.descendants(br.acronym2id("MOs"))["id"]
    expected = np.flatnonzero((label == 1) & np.isin(region, mos))
    with h5py.File(ibl_prepared / f"{ibl_cache.pids['main']}.h5", "r") as f:
        ids = f["cluster_ids"][:]
        n_in = int(f.attrs["n_heldin"])
        acronyms = f["acronyms"][:].astype(str)
        got_uuids = f["cluster_uuids"][:].astype(str)
        got_depths = f["depths"][:]
    assert sorted(ids) == sorted(expected) and len(ids) > 20
    for part in (ids[:n_in], ids[n_in:]):  # held-in, then held-out, each by depth
        assert np.all(np.diff(depths[part]) >= 0)
    assert len(ids) - n_in == round(0.25 * len(ids))
    np.testing.assert_array_equal(acronyms, br.id2acronym(region[ids]))
    assert set(acronyms) <= {"MOs1", "MOs2/3", "MOs5", "MOs6a", "MOs6b"}
    np.testing.assert_array_equal(got_uuids, uuids[ids])
    np.testing.assert_allclose(got_depths, depths[ids])


def test_counts_match_an_independent_binning(ibl_prepared, ibl_cache):
    alf = alf_dir(ibl_cache, "main")
    times = np.load(alf / "spikes.times.npy")  # every cluster's spikes, not the passing ones
    clusters = np.load(alf / "spikes.clusters.npy")
    table = trials_table(ibl_cache, "main")
    with h5py.File(ibl_prepared / f"{ibl_cache.pids['main']}.h5", "r") as f:
        ids, n_in = f["cluster_ids"][:], int(f.attrs["n_heldin"])
        bin_size, t_before = f.attrs["bin_size"], f.attrs["t_before"]
        for split in ("train", "valid"):
            rec, enc = f[f"{split}_recon_data"], f[f"{split}_encod_data"]
            assert rec.dtype == np.uint8 and rec.compression == "gzip"
            inds = f[f"{split}_inds"][:]
            starts = table["stimOn_times"].to_numpy()[inds] - t_before
            expected = histogram_counts(times, clusters, ids, starts, rec.shape[1], bin_size)
            np.testing.assert_array_equal(rec[:], expected)
            np.testing.assert_array_equal(enc[:], rec[:, :, :n_in])
            assert expected.sum() > 500


def test_trials_are_the_papers_at_its_revision(ibl_prepared, ibl_cache):
    table = trials_table(ibl_cache, "main")
    with h5py.File(ibl_prepared / f"{ibl_cache.pids['main']}.h5", "r") as f:
        train, valid = f["train_inds"][:], f["valid_inds"][:]
        assert not set(train) & set(valid)
        assert sorted(np.r_[train, valid]) == ibl_cache.kept
        assert len(valid) == round(0.2 * len(ibl_cache.kept))
        np.testing.assert_array_equal(f["trials_kept"][:], ibl_cache.kept)
        for col in ("stimOn_times", "firstMovement_times", "feedback_times", "choice",
                    "contrastLeft", "contrastRight", "feedbackType", "probabilityLeft"):
            np.testing.assert_array_equal(f[f"trials/{col}"][:], table[col].to_numpy())
        assert "trials/goCueTrigger_times" in f  # an attribute stored beside the table
        assert f["train_recon_data"].shape[1] == 100  # (0.2 + 0.8) s / 10 ms
    assert max(ibl_cache.kept) < ibl_cache.n_pass < ibl_cache.n_trials  # the session was cut
    a = file_attrs(ibl_prepared, ibl_cache)
    assert a["trials_revision"] == TRIALS_REVISION and a["trials_include"] == "filters"
    trials_read = [p for p in json.loads(a["datasets"]) if "trials" in p]
    assert "alf/_ibl_trials.table.pqt" in trials_read
    assert all(prep.alf_parts(p) == ("alf", "") for p in trials_read)  # not #2025-03-03#


def test_every_file_read_is_the_release_sorting(ibl_prepared, ibl_cache):
    a = file_attrs(ibl_prepared, ibl_cache)
    assert a["collection"] == "alf/probe00/pykilosort" and a["revision"] == REVISION
    read = json.loads(a["datasets"])
    sorting = [p for p in read if "probe00" in p]
    assert {prep.alf_parts(p) for p in sorting} == {("alf/probe00/pykilosort", REVISION)}
    names = {p.rsplit("/", 1)[1] for p in sorting}
    assert {"clusters.metrics.pqt", "channels.brainLocationIds_ccf_2017.npy",
            "passingSpikes.table.pqt"} <= names
    assert not {n for n in names if n.startswith("spikes.")}  # the passing spikes only
    assert a["pid"] == ibl_cache.pids["main"] and a["eid"] == ibl_cache.eids["main"]
    assert a["probe"] == "probe00" and a["align_event"] == "stimOn_times"
    assert (a["t_before"], a["t_after"], a["bin_size"]) == (0.2, 0.8, 0.01)
    assert a["settings_hash"] == prep.PrepConfig(regions=("MOs",)).settings_hash()
    assert a["session_ref"] == "2020-08-13_2_NYU-21"


def test_settings_hash_covers_the_sorting_and_the_trials():
    base = prep.PrepConfig().settings_hash()
    for change in ({"trials_revision": "2025-03-03"}, {"trials_include": "bwm_include"},
                   {"truncate_to_pass": False}, {"spike_sorter": "iblsorter"},
                   {"revision": "2025-01-01"}):
        assert prep.PrepConfig(**change).settings_hash() != base, change


def test_a_file_missing_from_the_revision_is_refused(ibl_prepared, ibl_cache):
    # ONE takes the missing clusters.uuids from the older unrevisioned sorting without a word
    reason = manifest(ibl_prepared).loc[ibl_cache.pids["stale"], "reason"]
    assert reason.startswith("ValueError: alf/probe01/pykilosort/clusters.uuids.csv: expected "
                             "collection alf/probe01/pykilosort at revision 2024-05-06")


def test_a_probe_without_regions_is_skipped_with_the_reason(ibl_prepared, ibl_cache):
    reason = manifest(ibl_prepared).loc[ibl_cache.pids["no_regions"], "reason"]
    assert reason.startswith("no channels.brainLocationIds_ccf_2017 in alf/probe00/pykilosort")


def test_units_do_not_depend_on_ibllibs_merge_clusters(ibl_cache, ibl_prepared, tmp_path,
                                                       monkeypatch):
    # ibllib up to 4.0.1 returns None from merge_clusters when given no spikes; 4.1 raises
    # without metrics: the preparation must give the same file whatever it does
    def old_merge(spikes, clusters, channels, *args, **kwargs):
        return None if spikes == {} else clusters

    monkeypatch.setattr(SpikeSortingLoader, "merge_clusters", staticmethod(old_merge))
    pid = ibl_cache.pids["main"]
    assert run_prep(ibl_cache, tmp_path, "--pids", pid) == 0
    assert manifest(tmp_path).loc[pid, "status"] == "ok"
    with h5py.File(tmp_path / f"{pid}.h5", "r") as f, \
            h5py.File(ibl_prepared / f"{pid}.h5", "r") as g:
        np.testing.assert_array_equal(f["cluster_ids"][:], g["cluster_ids"][:])
        np.testing.assert_array_equal(f["train_recon_data"][:], g["train_recon_data"][:])


def test_a_failed_trials_load_does_not_break_the_next_insertion(ibl_cache, tmp_path):
    # ibllib's SessionLoader.load_trials turns ONE's wildcards off and fails before turning
    # them on again
    bad, good = ibl_cache.pids["bad_trials"], ibl_cache.pids["main"]
    assert run_prep(ibl_cache, tmp_path, "--pids", bad, good) == 0
    m = manifest(tmp_path)
    assert m.loc[bad, "status"] == "failed" and m.loc[good, "status"] == "ok"
    assert "consistent size" in m.loc[bad, "reason"]


def test_trials_missing_at_the_revision_are_named_and_wildcards_restored(ibl_cache):
    one = prep.connect(ibl_cache.cache_dir, local=True)
    with pytest.raises(FileNotFoundError, match="no trials in alf on or before "
                       "--trials-revision 2024-07-10 .trials tables: "
                       "alf/#2025-03-03#/_ibl_trials.table.pqt"):
        prep.load_trials(one, ibl_cache.eids["stale"], prep.PrepConfig())
    assert one.wildcards is True


def test_the_passing_spikes_give_the_counts_of_all_spikes(ibl_cache, ibl_prepared, tmp_path,
                                                          monkeypatch):
    from one.alf.exceptions import ALFObjectNotFound

    one_cls = type(prep.connect(ibl_cache.cache_dir, local=True))
    load_object = one_cls.load_object

    def no_passing_spikes(self, eid, obj, *args, **kwargs):
        if obj == "passingSpikes":
            raise ALFObjectNotFound(obj)
        return load_object(self, eid, obj, *args, **kwargs)

    monkeypatch.setattr(one_cls, "load_object", no_passing_spikes)
    pid = ibl_cache.pids["main"]
    assert run_prep(ibl_cache, tmp_path, "--pids", pid) == 0
    with h5py.File(tmp_path / f"{pid}.h5", "r") as f, \
            h5py.File(ibl_prepared / f"{pid}.h5", "r") as g:
        for key in ("train_recon_data", "valid_recon_data", "cluster_ids"):
            np.testing.assert_array_equal(f[key][:], g[key][:])
        read = json.loads(f.attrs["datasets"])
    spikes_read = {p.rsplit("/", 1)[1] for p in read if "spikes" in p.lower()}
    assert spikes_read == {"spikes.times.npy", "spikes.clusters.npy"}  # nothing more


def test_bwm_include_gives_the_same_trials(ibl_cache, ibl_prepared, tmp_path):
    pid = ibl_cache.pids["main"]
    assert run_prep(ibl_cache, tmp_path, "--pids", pid, "--trials-include", "bwm_include") == 0
    with h5py.File(tmp_path / f"{pid}.h5", "r") as f:
        np.testing.assert_array_equal(f["trials_kept"][:], ibl_cache.kept)
        assert f.attrs["trials_include"] == "bwm_include"


def test_bwm_include_refuses_a_table_of_other_trials(ibl_cache, tmp_path, capsys):
    agg = pd.read_parquet(ibl_cache.cache_dir / "bwm_tables" / "trials.pqt")
    agg["stimOn_times"] += 0.5  # another extraction of the same session
    agg.to_parquet(tmp_path / "other.pqt")
    pid = ibl_cache.pids["main"]
    assert run_prep(ibl_cache, tmp_path / "out", "--pids", pid, "--trials-include",
                    "bwm_include", "--trials-table", str(tmp_path / "other.pqt")) == 0
    reason = manifest(tmp_path / "out").loc[pid, "reason"]
    assert "does not match the 460 trials loaded at --trials-revision 2024-07-10" in reason
    assert run_prep(ibl_cache, tmp_path / "out", "--trials-include", "bwm_include",
                    "--trials-table", str(tmp_path / "none.pqt")) == 2
    assert "no aggregate trials table" in capsys.readouterr().err


def test_no_truncate_keeps_the_whole_session(ibl_cache, tmp_path):
    pid = ibl_cache.pids["main"]
    assert run_prep(ibl_cache, tmp_path, "--pids", pid, "--no-truncate") == 0
    with h5py.File(tmp_path / f"{pid}.h5", "r") as f:
        kept = f["trials_kept"][:]
    assert kept.max() >= ibl_cache.n_pass and set(ibl_cache.kept) < set(kept)


def test_tables_of_a_release_tag_are_found(ibl_cache, tmp_path):
    # ONE keeps the tables of a tag it loaded in <cache>/<tag>/, next to the data folders
    cache = tmp_path / "cache"
    tag_dir = cache / prep.PrepConfig.tag
    tag_dir.mkdir(parents=True)
    for f in ibl_cache.cache_dir.iterdir():
        target = tag_dir / f.name if f.suffix == ".pqt" else cache / f.name
        os.symlink(f, target)
    assert prep.tables_dir(cache, prep.PrepConfig.tag) == tag_dir
    pid = ibl_cache.pids["main"]
    assert prep.main(["--local", "--cache-dir", str(cache), "--out-dir", str(tmp_path / "out"),
                      "--regions", "MOs", "--pids", pid]) == 0
    assert manifest(tmp_path / "out").loc[pid, "status"] == "ok"


def test_rerun_skips_what_is_done_and_retries_failures(ibl_prepared, ibl_cache, monkeypatch):
    path = ibl_prepared / f"{ibl_cache.pids['main']}.h5"
    before = path.stat().st_mtime_ns
    called = []
    real = prep.prepare
    monkeypatch.setattr(prep, "prepare", lambda one, ins, *a: called.append(ins["pid"])
                        or real(one, ins, *a))
    assert run_prep(ibl_cache, ibl_prepared) == 0
    failed = sorted(ibl_cache.pids[r] for r in ("no_spikes", "bad_trials", "stale"))
    assert sorted(called) == failed  # only the failures are tried again
    assert path.stat().st_mtime_ns == before
    m = manifest(ibl_prepared)
    assert m.loc[ibl_cache.pids["few_units"], "status"] == "skipped"


def test_a_lost_manifest_row_comes_back_and_other_runs_rows_stay(ibl_cache, tmp_path):
    pid = ibl_cache.pids["main"]
    assert run_prep(ibl_cache, tmp_path, "--pids", pid) == 0
    full = (tmp_path / "manifest.csv").read_text()
    # a kill between the file's rename and its row; or another run's row written meanwhile
    (tmp_path / "manifest.csv").write_text(full.splitlines()[0] + "\nother,e,p,ok,x,1,1,0,s,t\n")
    assert run_prep(ibl_cache, tmp_path, "--pids", pid) == 0
    m = manifest(tmp_path)
    assert m.loc[pid, "status"] == "ok" and m.loc[pid, "n_units"] > 0
    assert "other" in m.index


def test_new_settings_replace_the_file(ibl_cache, tmp_path):
    pid = ibl_cache.pids["main"]
    assert run_prep(ibl_cache, tmp_path, "--pids", pid) == 0
    assert run_prep(ibl_cache, tmp_path, "--pids", pid, "--bin-size", "0.02",
                    "--window", "-0.1", "0.5") == 0
    with h5py.File(tmp_path / f"{pid}.h5", "r") as f:
        assert f["train_recon_data"].shape[1] == 30 and f.attrs["bin_size"] == 0.02
        assert f.attrs["settings_hash"] == prep.PrepConfig(
            regions=("MOs",), bin_size=0.02, t_before=0.1, t_after=0.5).settings_hash()
    m = pd.read_csv(tmp_path / "manifest.csv")
    assert list(m["pid"]) == [pid] and m["status"][0] == "ok"


def test_too_few_trials_is_skipped(ibl_cache, tmp_path):
    pid = ibl_cache.pids["main"]
    n = len(ibl_cache.kept)
    assert run_prep(ibl_cache, tmp_path, "--pids", pid, "--min-trials", str(n + 1)) == 0
    m = pd.read_csv(tmp_path / "manifest.csv")
    assert m["status"][0] == "skipped"
    assert f"{n} of {ibl_cache.n_trials} trials kept (filters)" in m["reason"][0]
    assert not (tmp_path / f"{pid}.h5").exists()


def test_interrupted_write_leaves_no_file(ibl_cache, tmp_path, monkeypatch):
    def ctrl_c(*args, **kwargs):  # Ctrl-C after the count arrays are written
        raise KeyboardInterrupt

    monkeypatch.setattr(h5py.Group, "create_group", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_prep(ibl_cache, tmp_path, "--pids", ibl_cache.pids["main"])
    assert os.listdir(tmp_path) == []  # no file, no temporary, no manifest row


# ---------------------------------------------------------------------------------------------
# downstream: training (the tutorial data_demo.ipynb: tests/test_notebooks.py)


@pytest.fixture(scope="module")
def ibl_trained_run(ibl_prepared, ibl_cache, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    cmd = [sys.executable, "-m", "src.main", "--data-dir", str(ibl_prepared),
           "--ins", ibl_cache.pids["main"], "--max_steps", "4", "--results-dir", str(results),
           "--run", "ibl", "--no-plots", *IBL_TINY_MODEL]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return results / "ibl"


def test_prepared_file_trains(ibl_trained_run, ibl_prepared, ibl_cache):
    with h5py.File(ibl_prepared / f"{ibl_cache.pids['main']}.h5", "r") as f:
        shape = f["valid_recon_data"].shape
    with h5py.File(ibl_trained_run / "lfads_output.h5", "r") as o:
        assert o["valid_rates"].shape == shape
        assert np.isfinite(o["valid_rates"][:]).all()

