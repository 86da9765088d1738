"""AutoLFADS: LFADS's regularisation tuned per dataset by population-based training on Ray Tune.

    pip install -e ".[tune]"                                  # or ./setup.sh --tune
    python -m src.tune --data data/lorenz.h5                  # 8 members on this machine's cores
    python -m src.tune --data data/<pid>.h5 --population 16 --address auto   # a Ray cluster
    python -m src.tune --resume results/tune_lorenz           # after Ctrl-C, a crash or a kill
    python -m src.main --resume results/tune_lorenz/best      # train the chosen member on

A population of ordinary runs (the Trainer of src/trainer.py, a run folder each in
<out>/members) trains side by side. Every generation each member reports its smoothed
selection loss, the quantity a single run picks its checkpoint on (held-in validation
reconstruction: never held-out neurons, forward-prediction bins or the truth). The worst
quarter then take over the checkpoint of one of the best quarter (weights, AdamW's moments,
step: exploit) and perturb its hyperparameters within the bounds of SPACE (explore)
(Jaderberg et al. 2017; AutoLFADS, Keshtkaran et al. 2022). The search stops when the
population's best loss has not improved by --tol of itself for --patience generations, or at a
ceiling. The member with the lowest loss is exported to <out>/best, a normal run folder;
<out>/population.csv and hyperparameters.png show every member's hyperparameters over steps.
Any other flag (e.g. --gen-dim 200) goes to every member as to src.main. docs/tune.md has more.
"""

import argparse
import json
import logging
import math
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

from src import main as lfads_main
from src.data import DataError, load_session
from src.metrics import write_csv
from src.model import LFADSConfig
from src.runs import flag, overrides
from src.trainer import Stop, TrainConfig
from src.utils import FlagParser, atomic_copy, atomic_write_text

try:  # the [tune] extra is optional: main() says how to install it
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback
    from ray.tune.schedulers import PopulationBasedTraining
except ImportError:
    tune = None

INSTALL = 'pip install -e ".[tune]" (or ./setup.sh --tune)'


@dataclass(frozen=True)
class Hyper:
    low: float  # bounds of sampling and of every perturbation
    high: float
    log: bool  # first values drawn log-uniformly (scales spanning decades) or uniformly
    weight: float  # explore: the value times 1 +- u, u ~ U(0.002, 1) x weight
    init: float | None = None  # every member's first value; None = drawn
    per_element: bool = False  # the reference's bounds are per element: x T_rec x N here


# AutoLFADS's search space, as lfads-torch's scripts/run_pbt.py sets it (its explore weights
# too). Its loss averages the reconstruction over the T_rec x N elements of a trial where ours
# sums them (nats per trial): a KL or L2 scale s there is s x T_rec x N here (per_element).
SPACE = {
    "lr": Hyper(1e-5, 5e-3, log=True, weight=0.3, init=TrainConfig.lr),
    "dropout": Hyper(0.0, 0.6, log=False, weight=0.3),
    "cd_rate": Hyper(0.01, 0.7, log=False, weight=0.3, init=0.5),
    "kl_ic_scale": Hyper(1e-6, 1e-3, log=True, weight=0.8, per_element=True),
    "kl_co_scale": Hyper(1e-6, 1e-4, log=True, weight=0.8, per_element=True),
    "l2_gen_scale": Hyper(1e-4, 1.0, log=True, weight=0.8, per_element=True),
    "l2_con_scale": Hyper(1e-4, 1.0, log=True, weight=0.8, per_element=True),
}
CONTROLLER_ONLY = ("kl_co_scale", "l2_con_scale")  # not searched without a controller
# Ray Tune's own progress.csv and TensorBoard files (only its result.json is kept: Progress
# writes population.csv) and its warning about frequent experiment snapshots are left out
QUIET = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
         "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
NEVER_STOP = 10**9  # a member's own lr decay and plateau stop are off: PBT decides both


class SearchError(Exception):
    """A bad flag, file or cluster: main() prints it as one error line."""


def space_for(t_rec: int, n_out: int, co_dim: int, bounds: dict) -> dict:
    """SPACE in our units for data of t_rec bins and n_out neurons, with --bounds applied
    (given in our units) and the controller's terms left out when there is none."""
    out = {}
    for name, h in SPACE.items():
        if co_dim == 0 and name in CONTROLLER_ONLY:
            continue
        k = t_rec * n_out if h.per_element else 1
        out[name] = Hyper(h.low * k, h.high * k, h.log, h.weight, h.init, False)
    for name, (low, high) in bounds.items():
        if name not in out:
            raise SearchError(f"--bounds {name}: not searched (searched: {', '.join(out)})")
        h = out[name]
        init = h.init if h.init is not None and low <= h.init <= high else None
        out[name] = Hyper(low, high, h.log, h.weight, init)
    check_space(out)
    return out


def check_space(space: dict) -> None:
    for name, h in space.items():
        if not (math.isfinite(h.low) and math.isfinite(h.high) and h.low < h.high):
            raise SearchError(f"--bounds {name}={h.low:g}:{h.high:g}: the low bound must be "
                              "below the high one")
        if h.log and h.low <= 0:
            raise SearchError(f"--bounds {name}={h.low:g}:{h.high:g}: searched on a log scale, "
                              "so both bounds must be above 0")
        if name in ("dropout", "cd_rate") and (h.low < 0 or h.high >= 1):
            raise SearchError(f"--bounds {name}={h.low:g}:{h.high:g}: a share, at least 0 and "
                              "below 1")


def first_value(h: Hyper, rng: random.Random) -> float:
    if h.init is not None:
        return h.init
    if h.log:
        return math.exp(rng.uniform(math.log(h.low), math.log(h.high)))
    return rng.uniform(h.low, h.high)


def perturb(value: float, h: Hyper, rng: random.Random) -> float:
    """Explore: the value times 1 + u or 1 - u, u ~ U(0.002, 1) x weight, drawn again until
    inside the bounds (clipped after 100 draws, e.g. for a value stuck at 0)."""
    for _ in range(100):
        u = rng.uniform(0.002 * h.weight, h.weight)
        new = value * (1 + rng.choice((u, -u)))
        if h.low <= new <= h.high:
            return new
    return min(max(new, h.low), h.high)


def explorer(space: dict, seed: int):
    """Ray's custom_explore_fn: every searched value of a copied config perturbed."""
    rng = random.Random(seed)

    def explore(config: dict) -> dict:
        return {**config, **{k: perturb(config[k], h, rng) for k, h in space.items()}}
    return explore


# -----------------------------------------------------------------------------
# a member: one run folder, trained generation by generation inside a Ray worker


def member(config: dict, setup: dict) -> None:
    """Train one member from its Ray checkpoint (its own, or a better member's after an
    exploit) with this config's hyperparameters; report each generation's selection loss."""
    name = tune.get_context().get_trial_name()
    run_dir = os.path.join(setup["out"], "members", name)
    parent = take_checkpoint(tune.get_checkpoint(), run_dir)
    trainer = member_trainer(setup, config, run_dir)
    gen, ceiling = setup["generation"], setup["max_steps"]
    while True:
        trainer.tcfg.max_steps = min((trainer.state.step // gen + 1) * gen, ceiling)
        stop = trainer.fit()
        if stop is Stop.INTERRUPTED:
            return
        loss = trainer.state.smoothed if stop is not Stop.DIVERGED else math.inf
        loss = loss if loss is not None and math.isfinite(loss) else math.inf  # replaced
        with tempfile.TemporaryDirectory(dir=run_dir) as d:
            for f in ("ckpt_last.pt", "ckpt_best.pt"):
                if os.path.isfile(os.path.join(run_dir, f)):
                    shutil.copy2(os.path.join(run_dir, f), d)
            tune.report({"selection": loss, "step": trainer.state.step, "parent": parent, **config},
                        checkpoint=tune.Checkpoint.from_directory(d))
        parent = name


def take_checkpoint(ckpt, run_dir: str) -> str | None:
    """Put a Ray checkpoint's files into the member's run folder; the name of the member that
    wrote it (this one's own after a pause, another's after an exploit), None for a new one."""
    os.makedirs(run_dir, exist_ok=True)
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        for f in ("ckpt_last.pt", "ckpt_best.pt"):
            if os.path.isfile(os.path.join(d, f)):
                atomic_copy(os.path.join(d, f), os.path.join(run_dir, f))
    return os.path.basename(os.path.dirname(os.path.normpath(ckpt.path)))


def member_flags(setup: dict, config: dict) -> list[str]:
    """src.main's flags of a member: the search's own, this config's hyperparameters, and no
    lr decay or plateau stop of its own."""
    hyper = [x for k in setup["space"] for x in (flag(k), repr(float(config[k])))]
    return [*setup["flags"], *hyper, "--seed", str(config["seed"]), "--lr-patience",
            str(NEVER_STOP), "--patience", "0", "--max-minutes", "0",
            "--threads", str(setup["threads"])]


def member_trainer(setup: dict, config: dict, run_dir: str):
    """The Trainer of a member: new, or resumed from the checkpoint in its run folder with the
    config's hyperparameters (src.main --resume applies every changed flag)."""
    if os.path.isfile(os.path.join(run_dir, "ckpt_last.pt")):
        where = ["--resume", run_dir]
    else:
        where = ["--data", setup["data"], "--results-dir", os.path.dirname(run_dir), "--run",
                 os.path.basename(run_dir)]
    args = lfads_main.build_parser().parse_args(where + member_flags(setup, config))
    sessions, mcfg, tcfg, run_dir, ckpt = lfads_main.prepare(args)
    return lfads_main.build(sessions, mcfg, tcfg, run_dir, ckpt, 0, 1, lambda *a, **k: None)


# -----------------------------------------------------------------------------
# the driver: settings, Ray, the search, the exports


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(prog="python -m src.tune", description=__doc__)
    p.add_argument("--data", metavar="FILE", help="one session .h5 file")
    p.add_argument("--out", metavar="DIR", help="the search's folder (default: "
                   "results/tune_<session>)")
    p.add_argument("--resume", metavar="OUT", help="continue the search in OUT")
    p.add_argument("--population", type=int, default=8, metavar="N", help="members (default: "
                   "8; more than --workers take turns)")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="members training at "
                   "once, each with an equal share of the CPUs (and GPUs); default: one per CPU")
    p.add_argument("--address", metavar="HOST:PORT", help="join a running Ray cluster ('auto', "
                   "or host:port of `ray start --head`); default: start Ray on this machine")
    p.add_argument("--generation-epochs", type=float, default=25.0, metavar="EPOCHS",
                   help="epochs between exploits, rounded up to whole --eval-every periods "
                   "(default: 25, as lfads-torch)")
    p.add_argument("--burn-in-epochs", type=float, default=None, metavar="EPOCHS",
                   help="epochs before the first exploit (default: the KL and L2 ramps, then "
                   "one generation)")
    p.add_argument("--patience", type=int, default=4, metavar="N", help="stop after this many "
                   "generations without progress of the population's best loss (default: 4, "
                   "as lfads-torch)")
    p.add_argument("--tol", type=float, default=5e-4, metavar="SHARE", help="progress: the best "
                   "loss falls by this share of itself (default: 5e-4, lfads-torch's "
                   "min_improvement_ratio)")
    p.add_argument("--max-steps", type=int, default=20000, metavar="N",
                   help="ceiling on each member's steps (default: 20000)")
    p.add_argument("--max-minutes", type=float, default=0.0, metavar="MINUTES",
                   help="ceiling on the search's wall time in minutes; 0 = none (default: 0)")
    p.add_argument("--bounds", action="append", default=[], metavar="NAME=LOW:HIGH",
                   help="other bounds for a searched hyperparameter, in our units (KL and L2 on "
                   "nats per trial); repeatable")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seeds the first values, "
                   "the members' seeds and the perturbations (default: 0)")
    p.add_argument("--no-plots", action="store_true", help="skip the figures")
    for name, kind in (("generation_epochs", float), ("burn_in_epochs", float),
                       ("max_steps", int), ("max_minutes", float)):  # unlisted spellings
        p.add_argument("--" + name, dest=name, type=kind, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)
    return p


def check_member_flags(p: argparse.ArgumentParser, flags: list[str]) -> None:
    """Every flag left to the members must be src.main's: else one error line, naming the
    nearest flag of either command."""
    member = lfads_main.build_parser()
    known = {s for a in member._actions for s in a.option_strings}
    for f in flags:
        name = f.split("=")[0]
        if name.startswith("-") and name not in known and not is_number(name):
            listed = FlagParser(prog=p.prog, add_help=False, conflict_handler="resolve")
            for a in (*member._actions, *p._actions):
                if a.option_strings and a.help != argparse.SUPPRESS:
                    listed.add_argument(*a.option_strings, action="store_true")
            listed.error(f"unrecognized arguments: {name}")


def is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def parse_bounds(items: list[str]) -> dict:
    out = {}
    for item in items:
        try:
            name, rng = item.split("=")
            low, high = (float(x) for x in rng.split(":"))
        except ValueError:
            raise SearchError(f"--bounds {item}: expected NAME=LOW:HIGH, e.g. "
                              "lr=1e-4:1e-2") from None
        out[name] = (low, high)
    return out


def new_search(args, flags: list[str]) -> dict:
    """The settings of a new search, checked, as search.json keeps them."""
    if not args.data:
        raise SearchError("--data: give one session file (or --resume a search)")
    session = load_session(args.data)
    member = lfads_main.build_parser()
    member.prog = "python -m src.tune"
    given = member.parse_args(["--data", args.data, *flags])  # exits on a bad value
    for k in (*SPACE, "run"):
        if getattr(given, k) is not None:
            raise SearchError(f"{flag(k)} is the search's to set: leave it out of "
                              "the members' flags")
    co_dim = given.co_dim if given.co_dim is not None else LFADSConfig.co_dim
    sizes = session.sizes
    space = space_for(sizes["t_rec"], sizes["n_out"], co_dim, parse_bounds(args.bounds))
    for k, v in (("population", args.population), ("patience", args.patience),
                 ("max_steps", args.max_steps)):
        if v < 1:
            raise SearchError(f"--{k} {v}: must be at least 1")
    if args.population < 2:
        raise SearchError("--population 1: a population needs at least 2 members")
    tc = TrainConfig(**overrides(given, TrainConfig))
    per_epoch = -(-len(session.train) // tc.batch_size)
    periods = lambda epochs: max(1, math.ceil(epochs * per_epoch / tc.eval_every))  # noqa: E731
    generation = periods(args.generation_epochs) * tc.eval_every
    ramps = max(tc.kl_start + tc.kl_epochs, tc.l2_start + tc.l2_epochs)
    # exploits happen at generation ends: the first one past the ramps (or --burn-in-epochs)
    burn_in = periods(ramps if args.burn_in_epochs is None else args.burn_in_epochs
                      ) * tc.eval_every
    burn_in = (math.ceil(burn_in / generation) + (args.burn_in_epochs is None)) * generation
    rng = random.Random(args.seed)
    members = [{**{k: first_value(h, rng) for k, h in space.items()},
                "seed": rng.randrange(2**31)} for _ in range(args.population)]
    return {"data": os.path.abspath(args.data), "flags": flags, "generation": generation,
            "burn_in": burn_in, "space": {k: vars(h) for k, h in space.items()},
            "members": members, "patience": args.patience, "tol": args.tol,
            "max_steps": args.max_steps, "max_minutes": args.max_minutes, "seed": args.seed}


def member_name(trial) -> str:
    """member_00, member_01, ...: the trial's number in the population (Ray's trial ids end
    in it), for the run folders, Ray's folders and the table."""
    return f"member_{int(trial.trial_id.rsplit('_', 1)[-1]):02d}"


Stopper = tune.Stopper if tune else object
Callback = tune.Callback if tune else object


class PopulationPlateau(Stopper):
    """Ends the search when the population's best selection loss of a generation has not come
    below the best so far by `tol` of it for `patience` generations past the burn-in (as
    lfads-torch's ImprovementRatioStopper), and each member at --max-steps."""

    def __init__(self, search: dict):
        self.s, self.best_of, self.reported = search, {}, {}

    def __call__(self, trial_id, result) -> bool:
        g = result["step"] // self.s["generation"]
        self.best_of[g] = min(self.best_of.get(g, math.inf), result["selection"])
        self.reported.setdefault(g, set()).add(trial_id)
        return result["step"] >= self.s["max_steps"]

    def stop_all(self) -> bool:
        s, mark, since = self.s, math.inf, 0
        first = math.ceil(s["burn_in"] / s["generation"])
        for g in sorted(self.best_of):
            if g < first or len(self.reported[g]) < len(s["members"]):  # burn-in or running
                continue
            if self.best_of[g] < mark - s["tol"] * abs(mark) or mark == math.inf:
                mark, since = self.best_of[g], 0
            else:
                since += 1
        return since >= s["patience"]


class Generations(PopulationBasedTraining if tune else object):
    """Ray's synchronous PBT: every member ends a generation before the worst take over the
    best (as lfads-torch runs it). Ray restarts its count of generations at the burn-in when a
    search is resumed, so members restored past it would wait for a step they are all at; the
    count moves on to their next generation instead."""

    def choose_trial_to_run(self, tune_controller):
        trial = super().choose_trial_to_run(tune_controller)
        states = [t.status for t in tune_controller.get_trials()]
        if trial is None and "PAUSED" in states and "RUNNING" not in states:
            paused = [self._trial_state[t].last_train_time for t in tune_controller.get_trials()
                      if t.status == "PAUSED"]
            self._next_perturbation_sync = min(paused) + self._perturbation_interval
            trial = super().choose_trial_to_run(tune_controller)
        return trial


class Progress(Callback):
    """Each report of each member: a line on the terminal and a row of <out>/population.csv
    (step, selection loss, the member whose checkpoint the generation started from, and the
    hyperparameters), rewritten whole at each report so that a kill leaves it intact."""

    def __init__(self, out: str, names: list[str]):
        self.path, self.names, self.rows = os.path.join(out, "population.csv"), names, []

    def setup(self, **info):  # a resumed search goes on with the rows written so far
        self.rows = read_population(self.path) if os.path.isfile(self.path) else []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        name, parent = member_name(trial), result.get("parent") or ""
        row = {"member": name, "step": result["step"], "selection": result["selection"],
               "parent": parent, **{k: result[k] for k in self.names}}
        self.rows.append(row)
        write_csv(self.path, self.rows)
        took = f" (from {parent})" if parent and parent != name else ""
        print(f"{name} step {row['step']:6d} selection {row['selection']:.2f}{took}  " +
              " ".join(f"{k} {row[k]:.3g}" for k in self.names), flush=True)


def read_population(path: str) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return [{k: (v if k in ("member", "parent") else int(v) if k == "step" else float(v))
                 for k, v in r.items()} for r in csv.DictReader(f)]


def reachable(address: str) -> None:
    """A quick check that something answers at host:port: ray.init itself waits minutes."""
    if address == "auto":  # Ray finds the cluster started on this machine, or says so
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except (OSError, ValueError) as e:
        raise SearchError(f"--address {address}: nothing answers there ({e}); start a cluster "
                          "with `ray start --head` and give the address it prints "
                          "(docs/tune.md)") from e


def connect(address: str | None, workers: int) -> dict:
    """Ray started here or joined at --address; each member's resources, or a SearchError."""
    import ray

    if address:
        reachable(address)
    if ray.is_initialized():  # called again in one process (a notebook, the tests)
        pass
    elif address:
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise SearchError(f"--address {address}: no Ray cluster to join there ({e}); "
                              "start one with `ray start --head` (docs/tune.md)") from e
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    have = ray.cluster_resources()
    cpus, gpus = int(have.get("CPU", 0)), int(have.get("GPU", 0))
    workers = workers or cpus
    if not 1 <= workers <= cpus:
        raise SearchError(f"--workers {workers}: Ray has {cpus} CPUs here, so 1 to {cpus} "
                          "members can train at once (a larger --population takes turns)")
    return {"cpu": cpus // workers, "gpu": gpus_per_member(gpus, workers)}


def gpus_per_member(gpus: int, workers: int) -> float:
    """A member trains on one GPU at most, so more would sit idle; with fewer GPUs than
    members each takes an equal share, 1/k for the k members that must share a GPU. Ray takes
    fractions up to 1 and whole numbers above (gpus / workers, 8 / 3 = 2.67, is refused), and
    packs k shares of 1/k on one GPU, where 2 / 3 = 0.67 would fit only one member. Ray counts
    in units of 1/10000, rounded to the nearest (its fixed_point.cc): 1/k is rounded down, or
    7 shares of 1/7 would add up to more than one GPU."""
    if gpus == 0:
        return 0
    if gpus >= workers:
        return 1
    return math.floor(10000 / math.ceil(workers / gpus)) / 10000


def make_tuner(search: dict, out: str, resources: dict, resume: bool):
    """Ray Tune's Tuner for the search, new or restored from <out>/ray."""
    space = {k: Hyper(**h) for k, h in search["space"].items()}
    setup = {"data": search["data"], "flags": search["flags"], "space": list(space),
             "out": out, "generation": search["generation"], "max_steps": search["max_steps"],
             "threads": max(1, int(resources["cpu"]))}
    trainable = tune.with_resources(tune.with_parameters(member, setup=setup), resources)
    if resume:
        return tune.Tuner.restore(os.path.join(out, "ray"), trainable, resume_errored=True)
    domains = {k: (tune.loguniform if h.log else tune.uniform)(h.low, h.high)
               for k, h in space.items()}
    pbt = Generations(
        time_attr="step", perturbation_interval=search["generation"],
        burn_in_period=search["burn_in"], hyperparam_mutations=domains,
        quantile_fraction=0.25, resample_probability=0.0, perturbation_factors=(1.0,),
        custom_explore_fn=explorer(space, search["seed"]), synch=True)
    searcher = tune.search.BasicVariantGenerator(points_to_evaluate=search["members"])
    return tune.Tuner(
        trainable, param_space={**domains, "seed": tune.randint(0, 2**31)},
        tune_config=tune.TuneConfig(
            metric="selection", mode="min", scheduler=pbt, search_alg=searcher,
            num_samples=len(search["members"]), reuse_actors=True,
            time_budget_s=search["max_minutes"] * 60 or None,
            trial_name_creator=member_name, trial_dirname_creator=member_name),
        run_config=tune.RunConfig(
            name="ray", storage_path=out, stop=PopulationPlateau(search), verbose=0,
            callbacks=[Progress(out, list(space)), JsonLoggerCallback()],
            failure_config=tune.FailureConfig(max_failures=3),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4)))


# -----------------------------------------------------------------------------
# after the search: the population's table and figure, the best member exported


def plot_population(out: str, rows: list[dict], space: dict) -> None:
    """hyperparameters.png: each searched hyperparameter and the selection loss over steps,
    one line per member (a jump is an exploit)."""
    from src.plots import plt, save

    names = [*space, "selection"]
    fig, axes = plt.subplots(2, math.ceil(len(names) / 2), figsize=(3.6 * len(names) / 2, 6),
                             squeeze=False)
    for ax, k in zip(axes.flat, names):
        for m in sorted({r["member"] for r in rows}):
            mine = [r for r in rows if r["member"] == m]
            ax.plot([r["step"] for r in mine], [r[k] for r in mine], lw=1, label=m[-2:])
        if k in space and space[k]["log"]:
            ax.set_yscale("log")
        ax.set_title(k + (" (nats/trial)" if k == "selection" else ""), fontsize=10)
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=6, ncol=2, title="member", title_fontsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    save(fig, out, "hyperparameters.png")


def best_member(out: str) -> tuple[str, float]:
    """The member whose lineage reached the lowest smoothed selection loss (its ckpt_best.pt
    holds that model): the search's choice, on the single run's own criterion."""
    from src.resume import load

    found = []
    members = os.path.join(out, "members")
    for name in sorted(os.listdir(members)):
        path = os.path.join(members, name, "ckpt_last.pt")
        if os.path.isfile(path) and os.path.isfile(os.path.join(members, name, "ckpt_best.pt")):
            found.append((load(path)["loop"]["best"], name))
    if not found:
        raise SearchError(f"{members}: no member has a best checkpoint yet (the search ended "
                          "before the burn-in?)")
    loss, name = min(found)
    return name, loss


def export_best(out: str, name: str, threads: int, plots: bool) -> str:
    """<out>/best: the chosen member's run folder with lfads_output.h5, summary and figures,
    set to train on to the plateau when resumed with src.main."""
    src_dir, dst = os.path.join(out, "members", name), os.path.join(out, "best")
    os.makedirs(dst, exist_ok=True)
    for f in ("ckpt_last.pt", "ckpt_best.pt", "metrics.csv"):
        atomic_copy(os.path.join(src_dir, f), os.path.join(dst, f))
    tc = TrainConfig()
    args = lfads_main.build_parser().parse_args([
        "--resume", dst, "--patience", str(tc.patience), "--lr-patience", str(tc.lr_patience),
        "--max-steps", str(tc.max_steps), "--threads", str(threads)])
    sessions, mcfg, tcfg, run_dir, ckpt = lfads_main.prepare(args)
    trainer = lfads_main.build(sessions, mcfg, tcfg, run_dir, ckpt, 0, 1, lambda *a, **k: None)
    # a fresh count for the plateau stop and the lr decay from here on
    s = trainer.state
    s.mark, s.stalled, trainer.sched.num_bad_epochs = s.smoothed, 0, 0
    trainer.save("ckpt_last.pt")
    outputs = lfads_main.export(trainer)
    lfads_main.report(trainer, outputs, "search", plots)
    return dst


def settings(args, flags: list[str]) -> tuple[str, dict]:
    """The search's folder and settings: new, or from --resume (checked, nothing written)."""
    if args.resume:
        path = os.path.join(args.resume, "search.json")
        if not os.path.isfile(path):
            raise SearchError(f"--resume {args.resume}: no search there ({path} is missing)")
        if flags or args.data:
            raise SearchError("--resume takes the search's own settings; only --address and "
                              "--workers may change")
        with open(path) as f:
            return os.path.abspath(args.resume), json.load(f)
    search = new_search(args, flags)
    name = os.path.splitext(os.path.basename(args.data))[0]
    out = os.path.abspath(args.out or os.path.join("results", f"tune_{name}"))
    if os.path.exists(os.path.join(out, "search.json")):
        raise SearchError(f"{out} holds a search already: continue it with --resume {out}, or "
                          "pick another --out")
    return out, search


def save_search(out: str, search: dict) -> None:
    """The search's folder and search.json, once Ray is up: what --resume reads back."""
    os.makedirs(os.path.join(out, "members"), exist_ok=True)
    atomic_write_text(os.path.join(out, "search.json"), json.dumps(search, indent=2) + "\n")


def ended(search: dict, rows: list[dict], seconds: float) -> bool:
    """Whether the search came to its end (the plateau, every member at --max-steps, or the
    time ceiling), rather than to Ctrl-C or a failure: Ray's result says neither."""
    plateau = PopulationPlateau(search)
    for r in rows:
        plateau(r["member"], r)
    members = {r["member"] for r in rows if r["step"] >= search["max_steps"]}
    budget = search["max_minutes"] * 60
    return (plateau.stop_all() or len(members) == len(search["members"])
            or 0 < budget <= seconds)


def main(argv=None) -> int:
    p = build_parser()
    args, flags = p.parse_known_args(argv)
    check_member_flags(p, flags)
    if tune is None:
        print(f"error: python -m src.tune needs Ray Tune: {INSTALL}", file=sys.stderr)
        return 2
    logging.getLogger("ray.tune").setLevel(logging.WARNING)  # Progress prints what matters
    for k, v in QUIET.items():
        os.environ.setdefault(k, v)
    try:
        out, search = settings(args, flags)
        resources = connect(args.address, args.workers)
        if not args.resume:
            save_search(out, search)
        print(f"search {out}: {len(search['members'])} members, {search['generation']} steps "
              f"per generation, first exploit at step {search['burn_in']}")
        t0 = time.time()
        results = make_tuner(search, out, resources, bool(args.resume)).fit()
    except (SearchError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = os.path.join(out, "population.csv")
    rows = read_population(path) if os.path.isfile(path) else []
    if rows and not args.no_plots:
        plot_population(out, rows, search["space"])
    if results.errors or not ended(search, rows, time.time() - t0):
        why = f"{len(results.errors)} members failed" if results.errors else "interrupted"
        print(f"the search stopped before its end ({why}); continue with: python -m src.tune "
              f"--resume {out}", file=sys.stderr)
        return 1 if results.errors else 130
    name, loss = best_member(out)
    print(f"best: {name}, smoothed selection loss {loss:.2f}; exporting to {out}/best")
    export_best(out, name, 0, not args.no_plots)  # 0: torch's threads, the search is over
    return 0


if __name__ == "__main__":
    sys.exit(main())
