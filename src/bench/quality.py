"""Does it recover the truth? Train on ground-truth datasets and score against the truth.

    python -m src.bench quality                         # every dataset (about 40 min, 2 CPU cores)
    python -m src.bench quality --only lorenz           # one; the table keeps the others' rows
    python -m src.bench quality --only chaotic_rnn --steps 200      # a quicker, worse run

For each dataset it writes the session file (src/synth.py, deterministic for the seed), trains
with the settings in DATASETS through src.main (the same loop as any run), then scores the
best checkpoint on the validation trials twice, with rates averaged over `--samples` posterior
samples and with the posterior means: R2 of rates against the true rates (all neurons and the
held-out ones), co-bps next to its ceiling (the true rates scored the same way), and, for the
input-pulse data, how well the inferred inputs locate the pulses; for the chaotic RNN without
inputs also the R2 of an ideal observer that is given the true RNN (`ideal_observer`): a
practical ceiling for a model that must learn the dynamics from these spikes. It prints the
table and writes it as markdown and CSV in `--out`, and figures in `--media`.
"""

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from src import main as lfads_main
from src.data import load_session
from src.metrics import posterior_average, rate_metrics, region_bps, write_csv
from src.model import LFADS, LFADSConfig
from src.synth import (
    ChaoticRNNConfig,
    LorenzConfig,
    chaotic_rnn_units,
    make_chaotic_rnn,
    make_lorenz,
    write_session,
)
from src.utils import FlagParser, atomic_write_text

PULSE_TOLERANCE = 2  # bins: an inferred pulse this close to the true one counts as found


@dataclass
class Dataset:
    make: object  # () -> (data, attrs) of src.synth
    flags: list  # src.main flags: the model and training settings of this dataset


# Training budget: each dataset trains in at most about 14 minutes on a 2-core CPU
# (--max-minutes stops it otherwise); --threads 2 uses both cores.
COMMON = ["--threads", "2", "--max-minutes", "14"]
DATASETS = {
    # the quick start's data with 50 trials per condition instead of 20, and the reference
    # sizes (generator 200, factors 100) trained longer: a controller helps even on autonomous
    # Lorenz data, as the inputs correct the generator's small errors (docs/validation.md)
    "lorenz": Dataset(
        lambda: make_lorenz(LorenzConfig(trials_per_condition=50)),
        ["--gen-dim", "200", "--fac-dim", "100", "--max-steps", "4000", "--kl-epochs", "30",
         "--l2-epochs", "30", "--lr-patience", "3"]),
    # autonomous, so no controller; 50 factors, as the true rates span all 50 units; the KL
    # waits 20 epochs, 500 steps (else the IC posterior collapses onto the prior), and a light
    # IC KL and no generator L2 leave room for a chaotic 50-dimensional state
    # (docs/validation.md)
    "chaotic_rnn": Dataset(
        lambda: make_chaotic_rnn(ChaoticRNNConfig()),
        ["--co-dim", "0", "--gen-dim", "100", "--fac-dim", "50", "--max-steps", "8000",
         "--kl-start", "20", "--kl-epochs", "40", "--kl-ic-scale", "0.03",
         "--l2-gen-scale", "0", "--lr-patience", "1"]),
    # one input pulse per trial, which only the controller can explain; controller and its
    # encoder at 32 units, as the 100-step controller loop doubles the cost of a step
    "chaotic_rnn_pulses": Dataset(
        lambda: make_chaotic_rnn(ChaoticRNNConfig(input_magnitude=20.0)),
        ["--co-dim", "1", "--gen-dim", "100", "--fac-dim", "20", "--con-dim", "32",
         "--ci-enc-dim", "32", "--max-steps", "1800", "--kl-start", "20", "--kl-epochs", "40",
         "--kl-ic-scale", "0.1"]),
}

# a few seconds per dataset, for the test: tiny data, tiny model, a few steps
TINY = {
    "lorenz": lambda: make_lorenz(LorenzConfig(n_conditions=6, trials_per_condition=5,
                                               n_bins=20, n_fp_bins=4, n_neurons=10,
                                               n_heldout=3)),
    "chaotic_rnn": lambda: make_chaotic_rnn(ChaoticRNNConfig(
        n_conditions=6, trials_per_condition=5, n_neurons=10, n_heldout=3, n_bins=20,
        n_fp_bins=4)),
    "chaotic_rnn_pulses": lambda: make_chaotic_rnn(ChaoticRNNConfig(
        n_conditions=6, trials_per_condition=5, n_neurons=10, n_heldout=3, n_bins=20,
        n_fp_bins=4, input_magnitude=20.0)),
}
TINY_FLAGS = ["--ic-enc-dim", "8", "--ci-enc-dim", "8", "--con-dim", "8", "--ic-dim", "4",
              "--gen-dim", "16", "--fac-dim", "4", "--batch-size", "8", "--max-steps", "6",
              "--eval-every", "3", "--kl-epochs", "1", "--l2-epochs", "1", "--threads", "1",
              "--no-plots"]


# -----------------------------------------------------------------------------
# scores


def pulse_scores(co_means, pulse_time) -> dict:
    """Where is the inferred input largest, against where the pulse was?

    co_means: (B, T, U) inferred inputs; pulse_time: (B,) bins. The pulse is read as the bin
    of largest |u_t| (Euclidean norm over input dimensions) in each trial. `pulse_hits` is the
    share of trials where that bin is within PULSE_TOLERANCE of the truth; the pulses fall
    uniformly over the middle half of the trial, so a guess there hits about
    (2 * PULSE_TOLERANCE + 1) / (T / 2) of the time (10% for 100 bins); `pulse_hits_5`
    allows 5 bins (22%). `pulse_offset_median` is the median of peak bin - pulse bin:
    negative when the inferred input comes early.
    """
    size = np.linalg.norm(co_means, axis=2)  # (B, T)
    offset = size.argmax(1) - pulse_time  # (B,)
    err = np.abs(offset)
    onehot = np.zeros_like(size)
    onehot[np.arange(len(size)), pulse_time] = 1
    corr = np.corrcoef(size.ravel(), onehot.ravel())[0, 1]
    return {"pulse_hits": float(np.mean(err <= PULSE_TOLERANCE)),
            "pulse_hits_5": float(np.mean(err <= 5)), "pulse_err_median": float(np.median(err)),
            "pulse_offset_median": float(np.median(offset)), "pulse_corr": float(corr)}


def ideal_observer(data_path: str, iters: int = 60) -> dict | None:
    """R2 of an observer that is given the true RNN: a practical ceiling for LFADS on these data.

    For each validation trial it fits the initial state x0 that makes the counts the encoders
    see most likely under the true RNN and the recipe's prior x0 ~ N(0, x0_std^2) (maximum a
    posteriori, Adam from x0 = 0, `iters` steps per window), then scores the rates of that x0
    as LFADS's are scored. The fitted window grows from 5 bins to all encoder bins by half at a
    time: a chaotic trajectory fitted over the whole trial at once, from x0 = 0, sticks in
    poor local optima (R2 below 0), while early bins depend on x0 almost linearly. LFADS must
    learn the dynamics as well; this observer is given them and still cannot undo the Poisson
    noise. Its fit is local, so a better optimiser might find a little more: a practical
    ceiling, not a strict one. For the chaotic RNN without inputs only (None otherwise): with
    pulses it would need their times as well.
    """
    with h5py.File(data_path, "r") as f:
        if "rnn_weights" not in f or "valid_pulse_time" in f:
            return None
        w = torch.tensor(f["rnn_weights"][()], dtype=torch.float32)  # (N, N)
        cfg = ChaoticRNNConfig(**{k[6:]: v.item() for k, v in f.attrs.items()
                                  if k.startswith("synth_")})
    valid = load_session(data_path).valid
    counts = valid.encod.float()  # (B, T_enc, N_in)
    t_enc, n_in = counts.shape[1:]

    def expected_counts(x0, bins):  # (B, N) -> (B, bins, N), per bin, as src/synth.py's rates
        run = dataclasses.replace(cfg, n_bins=bins)
        units = torch.stack(chaotic_rnn_units(x0, w, run, tanh=torch.tanh), dim=1)
        return cfg.max_rate * cfg.bin_size * (units + 1) / 2

    windows, n = [], 5
    while n < t_enc:
        windows.append(n)
        n = math.ceil(1.5 * n)
    x0 = torch.zeros(len(counts), cfg.n_neurons, requires_grad=True)
    opt = torch.optim.Adam([x0], lr=0.05)
    for bins in windows + [t_enc]:
        for _ in range(iters):
            lam = expected_counts(x0, bins)[..., :n_in]  # (B, bins, N_in)
            # Poisson negative log likelihood (up to a constant) and the Gaussian prior
            loss = (lam - counts[:, :bins] * torch.log(lam)).sum() + 0.5 * (
                x0**2).sum() / cfg.x0_std**2
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        m = rate_metrics(expected_counts(x0, cfg.n_bins).numpy(), valid)
    return {"r2_ideal": m["r2"], "r2_heldout_ideal": m["r2_heldout"]}


def load_model(run_dir: str) -> LFADS:
    """The best checkpoint of a run (the last if none was better), in eval mode."""
    with open(os.path.join(run_dir, "config.json")) as f:
        model = LFADS(LFADSConfig(**json.load(f)["model"]))
    path = os.path.join(run_dir, "ckpt_best.pt")
    if not os.path.isfile(path):
        path = os.path.join(run_dir, "ckpt_last.pt")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own file
    model.load_state_dict(ckpt["model"])
    return model.eval()


def evaluate_run(name: str, data_path: str, run_dir: str, n_samples: int) -> tuple[dict, dict]:
    """Score a finished run on its validation trials; returns the table row and the outputs."""
    session = load_session(data_path)
    model = load_model(run_dir)
    n_in, t_enc = model.cfg.n_in, model.cfg.t_enc
    valid = session.valid
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    torch.manual_seed(0)  # the posterior samples
    t0 = time.time()
    sampled = posterior_average(model, valid.encod, valid.ext, n_samples)
    sample_s = time.time() - t0
    means = posterior_average(model, valid.encod, valid.ext, 0)
    s, m = rate_metrics(sampled["rates"], valid), rate_metrics(means["rates"], valid)
    ceiling = region_bps(valid.truth, valid.recon.numpy(), n_in, t_enc)
    row = {"dataset": name, "train_trials": len(session.train), "valid_trials": len(valid),
           "bins": model.cfg.t_rec, "neurons": model.cfg.n_out, "heldout": model.cfg.n_out - n_in,
           "gen_dim": model.cfg.gen_dim, "fac_dim": model.cfg.fac_dim,
           "co_dim": model.cfg.co_dim, "steps": summary["steps"],
           "train_minutes": summary["minutes"], "samples": n_samples,
           "sampling_seconds": round(sample_s, 1)}
    row.update({k: s[k] for k in ("r2", "r2_pooled", "r2_heldout", "co_bps", "bps", "fp_bps")})
    row.update({f"{k}_means": m[k] for k in ("r2", "r2_heldout", "co_bps")})
    row["co_bps_truth"] = ceiling["co_bps"]
    row.update(ideal_observer(data_path) or {})
    with h5py.File(data_path, "r") as f:  # pulse times are no part of the session contract
        pulse_time = f["valid_pulse_time"][()] if "valid_pulse_time" in f else None
    if pulse_time is not None and "co_means" in sampled:
        row.update(pulse_scores(sampled["co_means"], pulse_time))
        sampled["pulse_time"] = pulse_time
    return row, sampled


# -----------------------------------------------------------------------------
# the table


COLUMNS = [  # (header, key, format) of the markdown table
    ("dataset", "dataset", "{}"), ("trials train/valid", None, None),
    ("neurons (held-out)", None, None), ("bins", "bins", "{}"), ("steps", "steps", "{}"),
    ("train min", "train_minutes", "{:.1f}"), ("R2", "r2", "{:.3f}"),
    ("R2 held-out", "r2_heldout", "{:.3f}"), ("R2 means", "r2_means", "{:.3f}"),
    ("R2 ideal", "r2_ideal", "{:.3f}"),
    ("co-bps", "co_bps", "{:.3f}"), ("co-bps means", "co_bps_means", "{:.3f}"),
    ("co-bps truth", "co_bps_truth", "{:.3f}"), ("pulses found (+-2 bins)", "pulse_hits", "{:.0%}"),
    ("pulses found (+-5 bins)", "pulse_hits_5", "{:.0%}"),
    ("peak - pulse (median bins)", "pulse_offset_median", "{:+.0f}")]


def markdown(rows: list) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for header, key, fmt in COLUMNS:
            if header.startswith("trials"):
                cells.append(f"{r['train_trials']}/{r['valid_trials']}")
            elif header.startswith("neurons"):
                cells.append(f"{r['neurons']} ({r['heldout']})")
            else:
                cells.append(fmt.format(r[key]) if r.get(key) is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(out_dir: str, rows: list) -> str:
    table = markdown(rows)
    atomic_write_text(os.path.join(out_dir, "quality.md"), table)
    write_csv(os.path.join(out_dir, "quality.csv"), rows)
    return table


# -----------------------------------------------------------------------------
# figures


def plot(name: str, session, out: dict, media: str) -> None:
    """True against inferred rates (and, with pulses, inferred inputs against the pulses)."""
    from src import plots  # matplotlib only when drawing

    plt = plots.plt
    truth, rates, n_in = session.valid.truth, out["rates"], session.train.encod.shape[2]
    pulses = "pulse_time" in out
    n_tr = 4
    neurons = (0, 1, n_in - 1, truth.shape[2] - 1)  # the last one is held out
    rows = 2 if pulses else 1
    fig, axes = plt.subplots(rows, n_tr, figsize=(3.2 * n_tr, 2.6 * rows), squeeze=False)
    for j in range(n_tr):
        ax = axes[0, j]
        for n, c in zip(neurons, ("C0", "C1", "C2", "C3")):
            ax.plot(truth[j, :, n], c, lw=1.5, alpha=0.5)
            ax.plot(rates[j, :, n], c + "--", lw=1)
        ax.set(title=f"valid trial {j}: true -, LFADS --", xlabel="bin",
               ylabel="counts/bin" if j == 0 else None)
        if pulses:
            ax.axvline(out["pulse_time"][j], color="k", lw=0.8, ls=":")
            ax = axes[1, j]
            ax.plot(np.linalg.norm(out["co_means"][j], axis=1), "C4", label="|u_t| inferred")
            ax.axvline(out["pulse_time"][j], color="k", lw=0.8, ls=":", label="true pulse")
            ax.set(xlabel="bin", title="inferred input")
            if j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"{name}: neurons {neurons[:3]} held-in, {neurons[3]} held-out", fontsize=10)
    plots.save(fig, media, f"quality_{name}.png")


# -----------------------------------------------------------------------------


def run_one(name: str, args, extra_flags: list) -> dict:
    data_dir, runs = os.path.join(args.out, "data"), os.path.join(args.out, "runs")
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, f"{name}.h5")
    if args.rescore:  # score the trained run again, e.g. with new scores
        if not os.path.isfile(os.path.join(runs, name, "ckpt_last.pt")) or not \
                os.path.isfile(path):
            raise SystemExit(f"error: --rescore: no trained {name} run in {args.out}; "
                             "train it first (without --rescore)")
        print(f"== {name}: scoring {os.path.join(runs, name)} again", flush=True)
    else:
        data, attrs = (TINY[name] if args.tiny else DATASETS[name].make)()
        write_session(path, data, attrs)
        flags = TINY_FLAGS if args.tiny else COMMON + DATASETS[name].flags
        argv = ["--data", path, "--results-dir", runs, "--run", name, "--overwrite",
                "--n-samples", "0", *flags, *extra_flags]  # sampling is done below, on valid
        print(f"== {name}: python -m src.main {' '.join(argv)}", flush=True)
        if lfads_main.main(argv) != 0:
            raise SystemExit(f"training {name} failed")
    row, out = evaluate_run(name, path, os.path.join(runs, name), args.samples)
    if args.media:
        os.makedirs(args.media, exist_ok=True)
        plot(name, load_session(path), out, args.media)
    return row


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(prog="python -m src.bench quality", description=__doc__)
    p.add_argument("--only", nargs="+", choices=list(DATASETS), metavar="NAME",
                   help=f"datasets to run, of: {' '.join(DATASETS)} (default: all)")
    p.add_argument("--out", default="results/bench_quality", metavar="DIR",
                   help="data, runs and the table (default: %(default)s)")
    p.add_argument("--media", default="media", metavar="DIR",
                   help="figures go here; '' for none (default: %(default)s)")
    p.add_argument("--samples", type=int, default=50, metavar="N",
                   help="posterior samples (default: 50, as lfads-torch)")
    p.add_argument("--steps", type=int, metavar="N",
                   help="override every dataset's --max-steps")
    p.add_argument("--minutes", type=float, metavar="MINUTES",
                   help="override the training time limit (--max-minutes) of every dataset")
    p.add_argument("--tiny", action="store_true", help="tiny data and model: a smoke test")
    p.add_argument("--rescore", action="store_true",
                   help="no training: score the runs already in --out again")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    extra = []
    if args.steps is not None:
        extra += ["--max-steps", str(args.steps)]
    if args.minutes is not None:
        extra += ["--max-minutes", str(args.minutes)]
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "rows.json")
    rows = {}
    if os.path.isfile(results_path):  # earlier --only runs: keep their rows
        with open(results_path) as f:
            rows = json.load(f)
    for name in args.only or list(DATASETS):
        rows[name] = run_one(name, args, extra)
        atomic_write_text(results_path, json.dumps(rows, indent=2) + "\n")
    table = write_table(args.out, [rows[k] for k in DATASETS if k in rows])
    print(f"\nvalidation against ground truth (valid trials; R2 and co-bps of rates averaged "
          f"over {args.samples} posterior samples, 'means' at the posterior means):\n")
    print(table)
    return 0
