"""src/tune.py: population-based training on Ray Tune, in a tiny configuration.

The searches run on a local Ray instance of 2 CPUs: 4 tiny members, 10 steps per generation,
the first exploit at step 30. What is checked against something other than src/tune.py
itself: the exploits against Ray's own record of them (pbt_global.txt), the bounds and units
against hand computations, a copied checkpoint against the donor's file, the selection
against a file whose reported parts are scrambled, the exported run against src.main.
"""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import ray
import torch

from src import tune as search_cli
from src.main import main as lfads_main
from src.tune import SPACE, Hyper, PopulationPlateau, SearchError, perturb, space_for
from tests.conftest import TINY_MODEL
from tests.test_selection import scrambled

SEARCH = ["--population", "4", "--workers", "2", "--generation-epochs", "2", "--max-steps", "50",
          *TINY_MODEL, "--eval-every", "5"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def local_ray():
    for k, v in search_cli.QUIET.items():
        os.environ.setdefault(k, v)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run_search(h5, out, *extra) -> int:
    return search_cli.main(["--data", str(h5), "--out", str(out), *SEARCH, *extra])


def population(out) -> list[dict]:
    return search_cli.read_population(os.path.join(out, "population.csv"))


# -----------------------------------------------------------------------------
# the search space, the perturbation, the stop: no Ray needed


def test_the_search_space_is_autolfads_in_nats_per_trial():
    # lfads-torch's bounds are on a per-element mean: x (T_rec x N) = 20 bins x 12 neurons here
    s = space_for(t_rec=20, n_out=12, co_dim=2, bounds={})
    assert s["kl_ic_scale"].low == pytest.approx(1e-6 * 240)
    assert s["kl_ic_scale"].high == pytest.approx(1e-3 * 240)
    assert s["kl_co_scale"].high == pytest.approx(1e-4 * 240)
    assert s["l2_gen_scale"].high == pytest.approx(240.0)
    assert (s["lr"].low, s["lr"].high, s["lr"].init) == (1e-5, 5e-3, 2e-3)  # not per element
    assert (s["dropout"].low, s["dropout"].high) == (0.0, 0.6)
    assert set(space_for(20, 12, 0, {})) == set(SPACE) - {"kl_co_scale", "l2_con_scale"}
    given = space_for(20, 12, 2, {"kl_ic_scale": (0.5, 5.0)})  # --bounds are in our units
    assert (given["kl_ic_scale"].low, given["kl_ic_scale"].high) == (0.5, 5.0)


@pytest.mark.parametrize("bounds, words", [
    ({"lr": (1e-2, 1e-4)}, "--bounds lr=0.01:0.0001: the low bound must be below"),
    ({"kl_ic_scale": (0.0, 1.0)}, "log scale"),
    ({"dropout": (0.1, 1.0)}, "a share"),
    ({"gen_dim": (1, 2)}, "--bounds gen_dim: not searched"),
])
def test_impossible_bounds_are_refused_by_name(bounds, words):
    with pytest.raises(SearchError, match=words.replace("(", r"\(")):
        space_for(20, 12, 2, bounds)


def test_perturbations_stay_inside_the_bounds_and_the_explore_weight():
    import random

    rng, h = random.Random(0), Hyper(0.1, 10.0, log=True, weight=0.8)
    ups = downs = 0
    for value in (0.1, 0.2, 1.0, 9.0, 10.0):
        for _ in range(2000):
            new = perturb(value, h, rng)
            assert 0.1 <= new <= 10.0
            ratio = new / value  # 1 +- u, 0.002 w <= u <= w (lfads-torch's explore)
            assert 0.002 * 0.8 - 1e-12 <= abs(ratio - 1) <= 0.8 + 1e-12
            ups, downs = ups + (ratio > 1), downs + (ratio < 1)
    assert ups > 3000 and downs > 3000  # both ways, where the bounds allow
    stuck = Hyper(0.0, 0.6, log=False, weight=0.3)
    assert perturb(0.0, stuck, rng) == 0.0  # nothing to multiply: clipped, still in bounds


def test_the_search_stops_when_the_population_stops_improving():
    # generation 10, burn-in 20, 2 members, patience 2, tol 1%: worked out by hand
    stop = PopulationPlateau({"generation": 10, "burn_in": 20, "members": [{}, {}],
                              "patience": 2, "tol": 0.01, "max_steps": 1000})
    script = [(10, 50.0, 51.0), (20, 40.0, 45.0), (30, 30.0, 35.0),  # burn-in, then progress
              (40, 29.9, 31.0),  # 29.9 > 30 - 0.3: no progress (1)
              (50, 29.8, 29.75)]  # 29.75 > 29.7: no progress (2): stop
    for step, a, b in script:
        assert not stop.stop_all()
        assert not stop("a", {"step": step, "selection": a})
        assert not stop.stop_all()  # a generation counts once every member has reported
        stop("b", {"step": step, "selection": b})
    assert stop.stop_all()
    assert stop("a", {"step": 1000, "selection": 1.0})  # each member stops at --max_steps


# -----------------------------------------------------------------------------
# a member: an exploit copies the donor's checkpoint and takes the new hyperparameters


def test_an_exploit_copies_the_checkpoint_and_takes_every_new_hyperparameter(tiny_h5, tmp_path):
    members = tmp_path / "members"
    assert lfads_main(["--data", str(tiny_h5), "--results-dir", str(members), "--run",
                       "member_01", "--max_steps", "20", "--eval_every", "5", "--no-plots",
                       *TINY_MODEL]) == 0
    donor = torch.load(members / "member_01" / "ckpt_last.pt", weights_only=False)
    ray_dir = tmp_path / "ray" / "member_01" / "checkpoint_000003"  # as Ray stores it
    ray_dir.mkdir(parents=True)
    for f in ("ckpt_last.pt", "ckpt_best.pt"):
        (ray_dir / f).write_bytes((members / "member_01" / f).read_bytes())
    new = {"lr": 3e-4, "dropout": 0.45, "cd_rate": 0.15, "kl_ic_scale": 7.0,
           "kl_co_scale": 0.3, "l2_gen_scale": 11.0, "l2_con_scale": 13.0, "seed": 5}
    setup = {"data": str(tiny_h5), "flags": TINY_MODEL + ["--eval_every", "5"],
             "space": list(SPACE), "out": str(tmp_path), "generation": 10, "max_steps": 50,
             "threads": 1}
    run_dir = str(members / "member_00")
    parent = search_cli.take_checkpoint(ray.tune.Checkpoint.from_directory(str(ray_dir)),
                                        run_dir)
    tr = search_cli.member_trainer(setup, new, run_dir)
    assert parent == "member_01"
    assert tr.state.step == donor["loop"]["step"] == 20
    for k, v in donor["model"].items():
        assert torch.equal(tr.model.state_dict()[k], v), k
    saved = donor["optimizer"]["state"]
    for i, st in tr.opt.state_dict()["state"].items():
        assert torch.equal(st["exp_avg"], saved[i]["exp_avg"])  # AdamW's moments came along
    assert tr.opt.param_groups[0]["lr"] == 3e-4
    for k in ("dropout", "cd_rate", "kl_ic_scale", "kl_co_scale", "l2_gen_scale",
              "l2_con_scale"):
        assert getattr(tr.mcfg, k) == new[k], k
    tr.model.train()
    mask = tr.model.keep_mask(200_000, device="cpu")  # the dropout the model now applies
    assert (mask == 0).float().mean().item() == pytest.approx(0.45, abs=0.005)
    assert mask.max().item() == pytest.approx(1 / 0.55)
    one = torch.tensor(1.0)  # the objective weighs each term with the new scales (by hand)
    terms = {"recon": one * 0, "kl_ic": one, "kl_co": one * 2, "l2": one * 3}
    assert tr.model.total_loss(terms, 1.0, 1.0).item() == pytest.approx(7.0 + 0.6 + 3.0)
    assert tr.tcfg.patience == 0  # the member's own plateau stop is off: PBT decides


# -----------------------------------------------------------------------------
# whole searches on a local Ray


@pytest.fixture(scope="module")
def finished(local_ray, tmp_path_factory):
    """One tiny search to its end."""
    from src.synth import make_lorenz, write_session
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("search")
    h5 = root / "data" / "tiny.h5"
    h5.parent.mkdir()
    write_session(str(h5), *make_lorenz(TINY))
    assert run_search(h5, root / "out") == 0
    return h5, root / "out"


def ray_exploits(out) -> list[tuple]:
    """(member, donor, donor's config, new config) of each exploit in Ray's own log; Ray
    tags trial i's first config as 'i_...'."""
    found = []
    with open(os.path.join(out, "ray", "pbt_global.txt")) as f:
        for line in f:
            target, donor, _, _, old, new = json.loads(line)
            found.append((f"member_{int(target.split('_')[0]):02d}",
                          f"member_{int(donor.split('_')[0]):02d}", old, new))
    return found


def test_exploits_take_the_donor_ray_chose_and_perturb_within_bounds(finished):
    h5, out = finished
    rows = population(out)
    space = json.load(open(out / "search.json"))["space"]
    assert sorted({r["member"] for r in rows}) == [f"member_{i:02d}" for i in range(4)]
    assert max(r["step"] for r in rows) == 50
    took = [r for r in rows if r["parent"] not in ("", r["member"])]
    exploits = ray_exploits(out)
    assert exploits and len(took) == len(exploits)
    for r, (member, donor, old, new) in zip(sorted(took, key=lambda r: r["step"]), exploits):
        assert (r["member"], r["parent"]) == (member, donor)
        assert r["step"] > 30  # the first exploit is at the burn-in, step 30
        for k, h in space.items():
            assert r[k] == pytest.approx(new[k], rel=1e-5)
            assert h["low"] <= new[k] <= h["high"]
            u = abs(new[k] / old[k] - 1)
            assert 0.002 * h["weight"] - 1e-9 <= u <= h["weight"] + 1e-9 or new[k] in (
                h["low"], h["high"])


def test_the_best_member_is_exported_as_a_run_that_src_main_continues(finished):
    h5, out = finished
    best = out / "best"
    for f in ("ckpt_last.pt", "ckpt_best.pt", "metrics.csv", "config.json", "summary.json",
              "lfads_output.h5", "curves.png", "rates.png"):
        assert (best / f).is_file(), f
    assert (out / "hyperparameters.png").is_file()
    summary = json.load(open(best / "summary.json"))
    assert summary["stopped"] == "search" and summary["selected_on"] == "valid_recon_heldin"
    chosen = {}
    for m in os.listdir(out / "members"):
        ck = torch.load(out / "members" / m / "ckpt_last.pt", weights_only=False)
        chosen[m] = ck["loop"]["best"]
    name = min(chosen, key=chosen.get)
    a = torch.load(best / "ckpt_best.pt", weights_only=False)["model"]
    b = torch.load(out / "members" / name / "ckpt_best.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    step = summary["steps"]
    assert lfads_main(["--resume", str(best), "--max_steps", str(step + 10), "--no-plots"]) == 0
    assert json.load(open(best / "summary.json"))["steps"] == step + 10


def test_the_search_never_reads_what_is_reported(finished, tmp_path):
    # the validation trials' held-out neurons, forward-prediction bins and truth scrambled:
    # every member's selection loss, every exploit and every hyperparameter stay the same
    h5, out = finished
    assert run_search(scrambled(h5), tmp_path / "out") == 0
    order = lambda r: (r["step"], r["member"])  # noqa: E731  (rows come as members report)
    a, b = sorted(population(out), key=order), sorted(population(tmp_path / "out"), key=order)
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra == rb


def test_a_member_that_diverges_is_replaced(local_ray, tiny_h5, tmp_path):
    args, flags = search_cli.build_parser().parse_known_args(
        ["--data", str(tiny_h5), "--out", str(tmp_path / "out"), *SEARCH])
    out, search = search_cli.settings(args, flags)
    search["members"][0]["lr"] = 1e4  # every step of member_00 is non-finite from step 6
    resources = search_cli.connect(None, 2)
    search_cli.save_search(out, search)
    results = search_cli.make_tuner(search, out, resources, False).fit()
    assert not results.errors
    mine = [r for r in population(out) if r["member"] == "member_00"]
    assert any(math.isinf(r["selection"]) for r in mine if r["step"] <= 30)
    later = [r for r in mine if r["step"] > 30]
    assert later[0]["parent"] not in ("member_00", "")  # took a better member's checkpoint
    assert all(math.isfinite(r["selection"]) for r in later)
    assert later[0]["lr"] < 1e-2


def test_a_killed_search_resumes(tiny_h5, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "src.tune", "--data", str(tiny_h5), "--out", str(out),
           *SEARCH, "--no-plots"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # kill once every member is past the first exploit
            path = out / "population.csv"
            steps = {}
            if path.is_file():
                for r in csv.DictReader(open(path)):
                    steps[r["member"]] = int(r["step"])
            if len(steps) == 4 and min(steps.values()) >= 30:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the search did not reach step 30 in 2 minutes")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Ray's helpers of the killed driver
        except ProcessLookupError:
            pass
    done = subprocess.run([sys.executable, "-m", "src.tune", "--resume", str(out),
                           "--no-plots"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = population(out)
    for m in {r["member"] for r in rows}:
        firsts = [r for r in rows if r["member"] == m and r["step"] == 10]
        assert len(firsts) == 1, m  # none started again from scratch
        assert max(r["step"] for r in rows if r["member"] == m) == 50
    assert (out / "best" / "lfads_output.h5").is_file()


# -----------------------------------------------------------------------------
# errors


def test_without_ray_the_error_says_how_to_install_it(monkeypatch, tiny_h5, capsys):
    monkeypatch.setattr(search_cli, "tune", None)
    assert search_cli.main(["--data", str(tiny_h5)]) == 2
    assert 'pip install -e ".[tune]"' in capsys.readouterr().err


@pytest.mark.parametrize("extra, words", [
    (["--address", "127.0.0.1:1"], "--address 127.0.0.1:1: nothing answers there"),
    (["--population", "1"], "--population 1"),
    (["--lr", "0.1"], "--lr is the search's to set"),
    (["--kl-ic-scale=3"], "--kl-ic-scale is the search's to set"),
    (["--run-name", "x"], "--run is the search's to set"),
    (["--bounds", "lr=5"], "--bounds lr=5: expected NAME=LOW:HIGH"),
])
def test_bad_settings_are_refused_by_name(tiny_h5, tmp_path, capsys, extra, words):
    assert search_cli.main(["--data", str(tiny_h5), "--out", str(tmp_path / "o"),
                            *extra]) == 2
    assert words in capsys.readouterr().err


def test_more_workers_than_cpus_is_refused(local_ray, tiny_h5, tmp_path, capsys):
    assert run_search(tiny_h5, tmp_path / "o", "--workers", "3") == 2
    assert "--workers 3: Ray has 2 CPUs" in capsys.readouterr().err


def test_the_benchmark_runs_in_a_tiny_configuration(local_ray, tmp_path):
    from src.bench import tune as bench_tune

    out = tmp_path / "bench"
    assert bench_tune.main(["--tiny", "--only", "crnn", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "tune.csv")))
    assert [r["method"] for r in rows] == ["defaults", "search (4 members)"]
    space = json.load(open(out / "searches" / "crnn" / "search.json"))["space"]
    for k, h in space.items():  # what the table says was chosen lies inside the bounds
        assert h["low"] <= float(rows[1][k]) <= h["high"]
    assert "| crnn | search (4 members) |" in (out / "tune.md").read_text()
