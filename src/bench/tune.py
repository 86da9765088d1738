"""Does the search beat the defaults? A default run and a search, side by side on panel data.

    python -m src.bench tune                      # ibl_like and crnn, 25 min of search each
    python -m src.bench tune --only crnn --minutes 40
    python -m src.bench tune --tiny               # a smoke test in a minute

For each dataset (src/bench/panel.py's: by default the one where the defaults fare worst and
the chaotic RNN) it trains the default run (src.main, the same --minutes as its ceiling, so
both get the same CPU time at most: the default stops at its plateau) and a search
(src.tune, --population members on --workers cores, --minutes of wall time), then scores the
validation rates of each against the truth: R2, co-bps next to its ceiling. The table
(markdown and CSV in --out, and printed) gives the wall minutes of each and the
hyperparameters the search chose.
"""

import argparse
import json
import os
import time

import torch

from src import main as lfads_main
from src import tune as search
from src.bench.panel import PANEL, TINY, evaluate, generate
from src.bench.quality import TINY_FLAGS
from src.metrics import write_csv
from src.utils import FlagParser, atomic_write_text

NAMES = ["ibl_like", "crnn"]
# generations of one evaluation period (100 steps) and exploits from epoch 30: with 8 members
# on 2 cores a member trains a quarter as fast as a single run, and lfads-torch's 25 and 105
# epochs (sized for 20 members on GPUs) would leave crnn, at 19 steps per epoch, short of its
# first exploit after 25 minutes
BENCH_SEARCH = ["--generation-epochs", "5", "--burn-in-epochs", "30"]
# the tiny search: a few generations of the tiny model
TINY_SEARCH = ["--generation-epochs", "1", "--max-steps", "12", "--population", "4"]


def default_run(name: str, data: str, args) -> dict:
    """The default settings, with the search's wall time as ceiling."""
    runs = os.path.join(args.out, "runs")
    argv = ["--data", data, "--results-dir", runs, "--run", name, "--overwrite", "--no-plots",
            "--threads", str(args.workers), "--max-minutes", str(args.minutes),
            *(TINY + TINY_FLAGS if args.tiny else [])]
    print(f"== {name}, the defaults: python -m src.main {' '.join(argv)}", flush=True)
    t0 = time.time()
    if lfads_main.main(argv) != 0:
        raise SystemExit(f"error: the default run on {name} failed")
    row = evaluate(name, data, os.path.join(runs, name), (time.time() - t0) / 60)
    return {**row, "method": "defaults"}


def search_run(name: str, data: str, args) -> dict:
    """src.tune for --minutes; the exported best member's row with its hyperparameters."""
    out = os.path.join(args.out, "searches", name)
    if os.path.isfile(os.path.join(out, "search.json")):
        raise SystemExit(f"error: {out} holds an earlier search; move it away first")
    argv = ["--data", data, "--out", out, "--population", str(args.population), "--workers",
            str(args.workers), "--max-minutes", str(args.minutes), "--seed", str(args.seed),
            *BENCH_SEARCH]
    argv += TINY_SEARCH + TINY + without(TINY_FLAGS, "--max-steps") if args.tiny else []
    print(f"== {name}, the search: python -m src.tune {' '.join(argv)}", flush=True)
    t0 = time.time()
    if search.main(argv) != 0:
        raise SystemExit(f"error: the search on {name} failed")
    row = evaluate(name, data, os.path.join(out, "best"), (time.time() - t0) / 60)
    # the hyperparameters that trained the exported checkpoint (the member's may have moved on)
    best = torch.load(os.path.join(out, "best", "ckpt_best.pt"), map_location="cpu",
                      weights_only=False)  # ours; a member on a GPU saved GPU tensors
    cfg = {**best["train_config"], **best["model_config"]}
    chosen = {k: cfg[k] for k in search.SPACE}
    with open(os.path.join(out, "search.json")) as f:
        members = len(json.load(f)["members"])
    return {**row, "method": f"search ({members} members)", **chosen}


def without(flags: list[str], name: str) -> list[str]:
    """The flags less one flag and its value."""
    i = flags.index(name)
    return flags[:i] + flags[i + 2:]


def table(rows: list[dict]) -> str:
    head = ["dataset", "method", "wall min", "steps", "R2", "co-bps", "of ceiling",
            "chosen: lr, dropout, cd_rate, KL ic/co, L2 gen/con"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        hyper = ", ".join(f"{r[k]:.3g}" for k in search.SPACE if r.get(k) is not None)
        lines.append(f"| {r['dataset']} | {r['method']} | {r['wall_minutes']:.1f} | "
                     f"{r['steps']} | {r['r2']:.3f} | {r['co_bps']:.3f} / "
                     f"{r['co_bps_truth']:.3f} | {100 * r['co_bps'] / r['co_bps_truth']:.0f}% | "
                     f"{hyper} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(prog="python -m src.bench tune", description=__doc__)
    p.add_argument("--only", nargs="+", choices=list(PANEL), metavar="NAME",
                   help=f"datasets, of: {' '.join(PANEL)} (default: {' '.join(NAMES)})")
    p.add_argument("--out", default="results/bench_tune", metavar="DIR",
                   help="data, runs and the table (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=25.0, metavar="MINUTES",
                   help="wall minutes of each search, and the ceiling of each default run "
                   "(default: 25)")
    p.add_argument("--population", type=int, default=8, metavar="N",
                   help="members (default: 8)")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="members at once, and "
                   "the default run's threads (default: 2, this machine's cores)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="the search's seed (default: 0)")
    p.add_argument("--tiny", action="store_true", help="tiny data and model: a smoke test")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name in args.only or NAMES:
        data = generate(name, args.out, args.tiny)
        rows += [default_run(name, data, args), search_run(name, data, args)]
    text = table(rows)
    atomic_write_text(os.path.join(args.out, "tune.md"), text)
    write_csv(os.path.join(args.out, "tune.csv"), rows)
    print("\nthe defaults and the search (validation trials; rates against the truth):\n")
    print(text)
    return 0
