"""Train LFADS on session files and write a run folder: prepare -> build -> fit -> report.

    python -m src.main                       # every session file in ./data (several: stitched)
    python -m src.main --ins <pid>           # ./data/<pid>.h5
    python -m src.main --data path/to.h5 --gen_dim 100 --max_steps 500
    python -m src.main --data 'data/*.h5'    # one stitched model over several sessions
    python -m src.main --resume results/<run>

Every field of LFADSConfig (src/model.py) and TrainConfig (src/trainer.py) is a flag.
"""

import argparse
import dataclasses
import gc
import json
import os
import shlex
import sys

import torch

from src import checkpoint
from src.cli import add_config_flags
from src.data import DataError
from src.infer import posterior_average, write_outputs
from src.metrics import over_sessions, rate_metrics
from src.model import LFADSConfig
from src.prepare import prepare_ranks
from src.ranks import init_distributed, rank_device, world
from src.trainer import Stop, TrainConfig, Trainer, selection_key
from src.utils import atomic_write_text, pick_device, seed_everything


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m src.main", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a session .h5 file, or a quoted glob of several: one "
                   "stitched model (default: every file in --data-dir)")
    p.add_argument("--ins", help="an insertion id: trains on <data-dir>/<ins>.h5")
    p.add_argument("--data-dir", default="data", help="folder of session files (default: data)")
    p.add_argument("--results-dir", default="results", help="where run folders go")
    p.add_argument("--run", "--run-name", dest="run", help="run folder name (default: "
                   "<session>_<date>_<time>; under torchrun spell it --run-name: torchrun "
                   "reads --run as its own --run-path)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--no-plots", action="store_true", help="skip the figures")
    add_config_flags(p, "model (src/model.py LFADSConfig)", LFADSConfig)
    add_config_flags(p, "training (src/trainer.py TrainConfig)", TrainConfig)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rank, n_proc = world()
    if n_proc > 1:
        init_distributed(args.device or "auto")
    try:
        code = run(args, rank, n_proc)
        if n_proc > 1:  # the others wait while rank 0 writes the outputs: a process that
            torch.distributed.barrier()  # left the group early was seen to abort in gloo
        return code
    finally:
        if n_proc > 1:
            # the trainer sits in a reference cycle, so its DDP wrapper (which holds the
            # process group) would otherwise live on until the interpreter shuts down, and
            # gloo's threads torn down then could abort a rank (SIGABRT after "done")
            gc.collect()
            torch.distributed.destroy_process_group()


def run(args, rank: int, n_proc: int) -> int:
    """Train and export; under torchrun every process runs this, rank 0 alone writes."""
    say = print if rank == 0 else lambda *a, **k: None
    try:
        sessions, mcfg, tcfg, run_dir, ckpt = prepare_ranks(args, rank, n_proc)
    except DataError as e:
        say(f"error: {e}", file=sys.stderr)
        return 2
    trainer = build(sessions, mcfg, tcfg, run_dir, ckpt, rank, n_proc, say)
    launcher = f"torchrun --nproc_per_node={n_proc}" if n_proc > 1 else "python"
    resume = f"{launcher} -m src.main --resume {shlex.quote(run_dir)}"
    try:
        stop = trainer.fit()
        announce(stop, trainer, resume, say)
        outputs = export(trainer) if rank == 0 and stop.code == 0 else None
    except (OSError, KeyboardInterrupt) as e:  # a full disk; a second Ctrl-C during a save
        say(f"error: {e or type(e).__name__} at step {trainer.step}; {last_checkpoint(trainer)}."
            f" Continue with: {resume}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    if stop.code != 0:
        return 128 + trainer.signum if stop.code is None else stop.code
    if rank == 0:
        report(trainer, outputs, stop.label, plots=not args.no_plots)
    return 0


def build(sessions, mcfg, tcfg, run_dir, ckpt, rank: int, n_proc: int, say) -> Trainer:
    """The trainer on its device, with the checkpoint's state when resuming."""
    if tcfg.threads > 0:
        torch.set_num_threads(tcfg.threads)
    device = rank_device(pick_device(tcfg.device))
    seed_everything(tcfg.seed + rank)  # each process its own dropout masks and samples
    trainer = Trainer(sessions, mcfg, tcfg, run_dir, device)
    if ckpt is not None:
        checkpoint.restore(trainer, ckpt)
        if trainer.rows:  # drop rows written after the checkpoint: the run goes on from there
            trainer.write_metrics()
        diff = checkpoint.changes(ckpt["model_config"], mcfg) | checkpoint.changes(
            ckpt["train_config"], tcfg)
        say(f"resuming {run_dir} at step {trainer.step}" + (
            f" ({checkpoint.fmt(diff)})" if diff else ""))
    if rank == 0:
        write_config(run_dir, mcfg, tcfg, sessions)
    for s in sessions:
        n_in, n_out = s.sizes["n_in"], s.sizes["n_out"]
        say(f"training on {s.path}: {len(s.train)} train / {len(s.valid)} valid trials, "
            f"{mcfg.t_rec} bins of {s.bin_size * 1e3:g} ms, {n_out} neurons "
            f"({n_out - n_in} held out)")
    if len(sessions) > 1:
        say(f"one stitched model over {len(sessions)} sessions: read-ins to "
            f"{mcfg.readin_dim} shared dimensions ({trainer.pcr_dims} started by principal-"
            f"component regression; {'trained' if mcfg.readin_train else 'fixed'})")
    procs = f" x {n_proc} processes" if n_proc > 1 else ""
    say(f"device {device}{procs}; run folder {run_dir}")
    return trainer


def announce(stop: Stop, trainer: Trainer, resume: str, say) -> None:
    """What the run says about why it stopped (Stop's table)."""
    if stop.message:
        tc = trainer.tcfg
        say(stop.message.format(step=trainer.step, resume=resume, bad=tc.max_bad_steps,
                                tol=tc.plateau_tol, patience=tc.patience,
                                last=last_checkpoint(trainer),
                                lr=trainer.opt.param_groups[0]["lr"]),
            file=sys.stderr if stop.code != 0 else sys.stdout)


def last_checkpoint(trainer) -> str:
    if trainer.last_saved is None:
        return "no checkpoint was written yet"
    return f"{trainer.run_dir}/ckpt_last.pt (step {trainer.last_saved}) is intact"


def output_name(session, several: bool) -> str:
    """lfads_output.h5, or lfads_output_<session>.h5 for each of several sessions."""
    return f"lfads_output_{session.name}.h5" if several else "lfads_output.h5"


def export(trainer) -> list[dict]:
    """Posterior-averaged outputs of the best checkpoint (the last if none is better), one
    {split: {field: array}} per session."""
    best = os.path.join(trainer.run_dir, "ckpt_best.pt")
    if os.path.isfile(best):
        ckpt = torch.load(best, map_location=trainer.device, weights_only=False)  # our own file
        trainer.model.load_state_dict(ckpt["model"])
    n, every = trainer.tcfg.n_samples, []
    for i, s in enumerate(trainer.sessions):
        splits = {"train": (s.train.encod, s.train.ext), "valid": (s.valid.encod, s.valid.ext)}
        if s.test_encod is not None:
            splits["test"] = (s.test_encod, s.test_ext)
        outputs = {k: posterior_average(trainer.model, enc, ext, n, device=trainer.device,
                                        precision=trainer.tcfg.precision, session=i)
                   for k, (enc, ext) in splits.items()}
        path = os.path.join(trainer.run_dir, output_name(s, len(trainer.sessions) > 1))
        write_outputs(path, outputs, n)
        every.append(outputs)
    return every


def report(trainer, outputs: list[dict], stopped: str, plots: bool) -> None:
    """summary.json, the figures and the final lines: validation metrics of the exported rates.
    `stopped`: why training ended (a Stop's label, or "search" for src.tune's best member)."""
    sessions, run_dir = trainer.sessions, trainer.run_dir
    summary = {"steps": trainer.step, "minutes": round(trainer.elapsed / 60, 2),
               "stopped": stopped, "selected_on": f"valid_{selection_key(trainer.mcfg)}"}
    each = [rate_metrics(out["valid"]["rates"], s.valid) for s, out in zip(sessions, outputs)]
    valid = each[0] if len(each) == 1 else over_sessions(sessions, each)
    summary.update({f"valid_{k}": v for k, v in valid.items()})
    atomic_write_text(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    if plots:
        from src import plots as figures  # matplotlib is slow to import; only when drawing

        figures.make_all(run_dir, sessions, trainer.rows, outputs)
    print(f"done: {run_dir}, valid metrics of the posterior-averaged rates (best checkpoint):")
    print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in summary.items()))


def write_config(run_dir: str, mcfg: LFADSConfig, tcfg: TrainConfig, sessions: list) -> None:
    """config.json: both configs and the session file (a list of them when stitched), enough
    to rebuild the model."""
    paths = [s.path for s in sessions]
    cfg = {"model": dataclasses.asdict(mcfg), "train": dataclasses.asdict(tcfg),
           "data": paths if len(paths) > 1 else paths[0]}
    atomic_write_text(os.path.join(run_dir, "config.json"), json.dumps(cfg, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
