"""src/ibl/prep.py online, against a stand-in for the Alyx database (src.ibl.fixture.FakeAlyx):
ONE's own remote mode lists the release, queries sessions and downloads files from a fixture
cache (the "server") into an empty client cache. What such a run downloaded must be reusable
offline with --local, and only what is used may be downloaded.
"""

import json

import h5py
import numpy as np
import one.webclient
import pandas as pd
import pytest
from one.api import ONE

from src.ibl import prep
from src.ibl.fixture import FakeAlyx, make_local_cache


@pytest.fixture(scope="module")
def server(ibl_home, tmp_path_factory):
    return make_local_cache(tmp_path_factory.mktemp("server") / "cache")


@pytest.fixture
def alyx(server, monkeypatch):
    """ONE's web client replaced by the stand-in; the factory keeps each client it made."""
    factory = FakeAlyx.factory(server)
    monkeypatch.setattr(one.webclient, "AlyxClient", factory)
    ONE.cache_clear()
    yield factory
    ONE.cache_clear()


def prep_args(client, out, *args):
    return ["--cache-dir", str(client), "--out-dir", str(out), "--regions", "MOs", *args]


@pytest.fixture(scope="module")
def online_run(server, tmp_path_factory):
    """The release prepared online into an empty client cache, then the same offline over that
    cache: (client cache, online output, offline output, files served)."""
    tmp = tmp_path_factory.mktemp("online")
    with pytest.MonkeyPatch.context() as mp:
        factory = FakeAlyx.factory(server)
        mp.setattr(one.webclient, "AlyxClient", factory)
        ONE.cache_clear()
        assert prep.main(prep_args(tmp / "client", tmp / "online")) == 0
        served = list(factory.instances[str(tmp / "client")].served)
        ONE.cache_clear()
        assert prep.main(["--local", *prep_args(tmp / "client", tmp / "offline")]) == 0
        ONE.cache_clear()
    return tmp / "client", tmp / "online", tmp / "offline", served


def test_the_release_is_listed_through_one(online_run, server):
    client, online, _, _ = online_run
    m = pd.read_csv(online / "manifest.csv").set_index("pid")
    assert sorted(m.index) == sorted(server.pids[r] for r in server.release)
    assert m.loc[server.pids["main"], "status"] == "ok"
    table = pd.read_parquet(client / "insertions.pqt")  # ONE's table, saved for offline runs
    assert set(server.pids[r] for r in server.release) <= set(table.reset_index()["id"])


def test_what_an_online_run_downloaded_prepares_the_same_offline(online_run):
    _, online, offline, _ = online_run
    m_on = pd.read_csv(online / "manifest.csv").set_index("pid")
    m_off = pd.read_csv(offline / "manifest.csv").set_index("pid")
    cols = ["status", "reason", "n_units", "n_trials", "settings"]
    pd.testing.assert_frame_equal(m_on[cols], m_off[cols])
    assert (m_off["bytes_downloaded"] == 0).all()
    for pid in m_on.index[m_on["status"] == "ok"]:
        with h5py.File(online / f"{pid}.h5", "r") as f, h5py.File(offline / f"{pid}.h5") as g:
            assert sorted(f) == sorted(g)
            for key in ("train_recon_data", "valid_recon_data", "cluster_ids", "trials_kept"):
                np.testing.assert_array_equal(f[key][:], g[key][:])
            differ = {k for k in f.attrs if k not in ("source", "created")
                      and str(f.attrs[k]) != str(g.attrs[k])}
            assert not differ


def test_only_what_is_used_is_downloaded_and_counted(online_run, server):
    client, online, _, served = online_run
    assert served and not [p for p in served if "/spikes." in p or "iblsorter" in p]
    assert not [p for p in served if "#2025-03-03#" in p]  # trials at the paper's revision
    assert "alf/probe00/pykilosort/#2024-05-06#/passingSpikes.table.pqt" in served
    m = pd.read_csv(online / "manifest.csv").set_index("pid")
    main = server.pids["main"]
    with h5py.File(online / f"{main}.h5", "r") as f:
        read = json.loads(f.attrs["datasets"])
    session = client / server.session_paths["main"].relative_to(server.cache_dir)
    # every file the insertion read was downloaded for it (its probe, its session's trials)
    assert m.loc[main, "bytes_downloaded"] == sum((session / p).stat().st_size for p in read)
    data = [f for f in client.glob("*/Subjects/**/*") if f.is_file()]
    assert m["bytes_downloaded"].sum() == sum(f.stat().st_size for f in data)


def test_the_cache_is_saved_after_each_insertion(server, alyx, tmp_path, monkeypatch):
    done = []
    real = prep.prepare

    def interrupted(one, ins, *args):
        if done:
            raise KeyboardInterrupt  # Ctrl-C during the second insertion
        done.append(ins["pid"])
        return real(one, ins, *args)

    monkeypatch.setattr(prep, "prepare", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep.main(prep_args(tmp_path / "client", tmp_path / "out", "--pids",
                            server.pids["main"], server.pids["few_units"]))
    ONE.cache_clear()
    monkeypatch.setattr(prep, "prepare", real)
    pid = server.pids["main"]  # prepared before the interruption: reusable offline
    assert prep.main(["--local", *prep_args(tmp_path / "client", tmp_path / "offline",
                                            "--pids", pid)]) == 0
    m = pd.read_csv(tmp_path / "offline" / "manifest.csv").set_index("pid")
    assert m.loc[pid, "status"] == "ok" and m.loc[pid, "bytes_downloaded"] == 0


def test_pids_outside_the_release_get_a_reason(server, alyx, tmp_path):
    pid = server.pids["no_regions"]
    assert prep.main(prep_args(tmp_path / "client", tmp_path / "out", "--pids", pid)) == 0
    m = pd.read_csv(tmp_path / "out" / "manifest.csv").set_index("pid")
    assert m.loc[pid, "status"] == "skipped"
    assert m.loc[pid, "reason"].startswith("no channels.brainLocationIds_ccf_2017 in alf/probe00")


def test_an_unknown_pid_is_refused(server, alyx, tmp_path, capsys):
    assert prep.main(prep_args(tmp_path / "client", tmp_path / "out", "--pids", "nope")) == 2
    assert "--pids: no insertion nope on https://alyx.fixture.test" in capsys.readouterr().err
