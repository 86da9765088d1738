"""Train LFADS on session files and write a run folder: flags -> sessions and settings -> the
trainer -> fit -> lfads_output.h5 -> summary and figures (read `run`).

    python -m src.main                       # every session file in ./data (several: stitched)
    python -m src.main --ins <pid>           # ./data/<pid>.h5
    python -m src.main --data path/to.h5 --gen-dim 100 --max-steps 500
    python -m src.main --resume results/<run>

Every field of LFADSConfig (src/model.py) and TrainConfig (src/trainer.py) is a flag, its help
the comment beside the field.
"""

import argparse
import dataclasses
import inspect
import json
import os
import re
import shlex
import sys
import time

import torch

from src import scan
from src.data import DataError, find_session_files, load_session
from src.metrics import posterior_average, rate_metrics, write_outputs
from src.model import LFADSConfig
from src.runs import DATA_SIZES, check_settings, new_run_dir, output_name, overrides, write_config
from src.trainer import Stop, TrainConfig, Trainer, selection_key
from src.utils import FlagParser, atomic_write_text, pick_device, seed_everything, use_device

# -----------------------------------------------------------------------------
# the run


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # under torchrun: src/distributed.py
        from src.distributed import main_ranks

        return main_ranks(args, run)
    return run(args)


def run(args, rank: int = 0, n_proc: int = 1) -> int:
    """Train and export; under torchrun every process runs this and rank 0 alone writes."""
    say = print if rank == 0 else lambda *a, **k: None
    try:
        if n_proc > 1:
            from src.distributed import prepare_ranks

            sessions, mcfg, tcfg, run_dir, ckpt = prepare_ranks(args, rank, n_proc, prepare)
        else:
            sessions, mcfg, tcfg, run_dir, ckpt = prepare(args)
    except DataError as e:
        say(f"error: {e}", file=sys.stderr)
        return 2
    trainer = build(sessions, mcfg, tcfg, run_dir, ckpt, rank, n_proc, say)
    trainer.log = None if args.quiet else say  # a line per evaluation, rank 0 only
    if not args.no_plots:  # curves.png redrawn while it trains; matplotlib only then
        from src.plots import curves

        trainer.draw = curves
    launcher = f"torchrun --nproc_per_node={n_proc}" if n_proc > 1 else "python"
    resume = f"{launcher} -m src.main --resume {shlex.quote(run_dir)}"
    try:
        stop = trainer.fit()
        announce(stop, trainer, resume, say)
        if scan.COMPILE["seconds"]:
            say(f"torch.compile: {scan.COMPILE['seconds']:.0f} s of the training time compiled the "
                "recurrent steps (cached: later runs start faster; --compile off skips it)")
        outputs = export(trainer) if rank == 0 and stop.code == 0 else None
    except (OSError, KeyboardInterrupt) as e:  # a full disk; a second Ctrl-C during a save
        say(f"error: {e or type(e).__name__} at step {trainer.state.step}; "
            f"{last_checkpoint(trainer)}. Continue with: {resume}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    if stop.code != 0:
        return 128 + trainer.signum if stop.code is None else stop.code
    if rank == 0:
        report(trainer, outputs, stop.label, plots=not args.no_plots)
        analyses(trainer, plots=not args.no_plots)
    return 0


def prepare(args, lead: bool = True, n_proc: int = 1) -> tuple:
    """(sessions, model config, train config, run folder, checkpoint or None), all checked
    before a run folder is made or touched; a DataError otherwise."""
    if args.resume:
        from src.resume import resumed_run

        return resumed_run(args, lead, n_proc)
    files = find_session_files(args.data, args.ins, args.data_dir)
    if len(files) > 1:
        from src.stitch import load_sessions

        sessions, sizes = load_sessions(files)
    else:
        sessions = [load_session(files[0])]
        sizes = sessions[0].sizes
    mcfg = LFADSConfig(**{**data_sized(overrides(args, LFADSConfig), sizes), **sizes})
    tcfg = TrainConfig(**overrides(args, TrainConfig))
    check_settings(mcfg, tcfg, n_proc)
    name = f"stitched{len(sessions)}" if len(sessions) > 1 else sessions[0].name
    run_dir = os.path.join(args.results_dir, args.run or f"{name}_{time.strftime('%Y%m%d_%H%M%S')}")
    if lead:
        new_run_dir(run_dir, args.overwrite)
    return sessions, mcfg, tcfg, run_dir, None


def data_sized(given: dict, sizes: dict) -> dict:
    """No more factors than the fewest neurons of a session, unless --fac-dim says so: more
    only add directions the read-out cannot tell apart (lfads-torch's configurations agree)."""
    neurons = min(sizes.get("session_n_out") or [sizes["n_out"]])
    if "fac_dim" not in given and LFADSConfig.fac_dim > neurons:
        return {**given, "fac_dim": neurons}
    return given


def build(sessions, mcfg, tcfg, run_dir, ckpt, rank: int, n_proc: int, say) -> Trainer:
    """The trainer on its device: src/trainer.py's for one session in one process."""
    if tcfg.threads > 0:
        torch.set_num_threads(tcfg.threads)
    device = pick_device(tcfg.device)
    if n_proc > 1:  # several processes: DDP and the collectives (src/distributed.py)
        from src.distributed import rank_device

        device = rank_device(device)
    device = use_device(device, tcfg.precision)  # before DDP and any draw on the GPU
    if n_proc > 1 and len(sessions) > 1:
        from src.distributed import DistributedStitchedTrainer as cls
    elif n_proc > 1:
        from src.distributed import DistributedTrainer as cls
    elif len(sessions) > 1:  # read-ins, read-outs, batches drawn by session (src/stitch.py)
        from src.stitch import StitchedTrainer as cls
    else:
        cls = Trainer
    seed_everything(tcfg.seed + rank)  # each process its own dropout masks and samples
    trainer = cls(sessions, mcfg, tcfg, run_dir, device)
    if ckpt is not None:  # resuming: the checkpoint's state (src/resume.py)
        from src.resume import restore

        restore(trainer, ckpt, say)
    if rank == 0:
        write_config(run_dir, mcfg, tcfg, sessions)
    for s in sessions:
        n_in, n_out = s.sizes["n_in"], s.sizes["n_out"]
        say(f"training on {s.path}: {len(s.train)} train / {len(s.valid)} valid trials, "
            f"{mcfg.t_rec} bins of {s.bin_size * 1e3:g} ms, {n_out} neurons "
            f"({n_out - n_in} held out)")
    if len(sessions) > 1:
        say(trainer.note())
    procs = f" x {n_proc} processes" if n_proc > 1 else ""
    say(f"device {device}{procs}; run folder {run_dir}")
    return trainer


def announce(stop: Stop, trainer: Trainer, resume: str, say) -> None:
    """Why the run stopped, and how to go on."""
    tc, step = trainer.tcfg, trainer.state.step
    lr = trainer.opt.param_groups[0]["lr"]
    message = {
        Stop.PLATEAU: f"stopping at step {step}: the plateau (the smoothed selection loss made "
                      f"no progress of {tc.plateau_tol:g} of it in {tc.patience} evaluations)",
        Stop.MAX_STEPS: f"stopping at step {step}: the --max-steps ceiling, before the plateau; "
                        f"continue with: {resume} --max-steps <more>",
        Stop.TIME: f"stopping at step {step}: the --max-minutes ceiling, before the plateau; "
                   f"continue with: {resume} --max-minutes <more>",
        Stop.INTERRUPTED: f"interrupted at step {step}; continue with: {resume}",
        Stop.DIVERGED: f"error: stopped at step {step}: {tc.max_bad_steps} steps in a row had a "
                       "non-finite loss or gradient. They were skipped, so the weights stay "
                       f"finite; {last_checkpoint(trainer)}. Lower --lr (now {lr:g}) or check "
                       f"the data, then continue with: {resume} --lr <lower>",
    }[stop]
    say(message, file=sys.stderr if stop.code != 0 else sys.stdout)


def last_checkpoint(trainer) -> str:
    if trainer.last_saved is None:
        return "no checkpoint was written yet"
    return f"{trainer.run_dir}/ckpt_last.pt (step {trainer.last_saved}) is intact"


def export(trainer) -> list[dict]:
    """lfads_output.h5: outputs of the best checkpoint (the last if none is better), averaged
    over posterior samples; one {split: {field: array}} per session."""
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
                                        precision=trainer.tcfg.precision, **trainer.kw(i))
                   for k, (enc, ext) in splits.items()}
        name = output_name(s.path, len(trainer.sessions) > 1)
        write_outputs(os.path.join(trainer.run_dir, name), outputs, n)
        every.append(outputs)
    return every


def report(trainer, outputs: list[dict], stopped: str, plots: bool) -> None:
    """summary.json, the figures and the last lines: validation metrics of the exported rates.
    `stopped`: why training ended (a Stop's label, or "search" for src.tune's best member)."""
    sessions, run_dir, s = trainer.sessions, trainer.run_dir, trainer.state
    summary = {"steps": s.step, "minutes": round(s.elapsed / 60, 2), "stopped": stopped,
               "selected_on": f"valid_{selection_key(trainer.mcfg)}"}
    each = [rate_metrics(out["valid"]["rates"], s.valid) for s, out in zip(sessions, outputs)]
    summary.update({f"valid_{k}": v for k, v in trainer.overall(each).items()})
    from src.baseline import session_scores  # NLB's smoothing baseline: after training only

    base = [session_scores(s) for s in sessions]  # the same training and validation trials
    summary.update({f"valid_{k}": v for k, v in trainer.overall(base).items()})
    atomic_write_text(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    if plots:
        from src import plots as figures  # matplotlib is slow to import: only when drawing

        figures.make_all(run_dir, sessions, s.rows, outputs)
    best = os.path.isfile(os.path.join(run_dir, "ckpt_best.pt"))
    which = "best checkpoint" if best else "last checkpoint: none is best before the ramps end"
    print(f"done: {run_dir}, valid metrics of the posterior-averaged rates ({which}):")
    print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in summary.items()))


def analyses(trainer, plots: bool) -> None:
    """What a session file asks for after training, imported only then: the merged rates of a
    chopped recording (src/chop.py), behaviour decoded from the rates (src/decode.py)."""
    extras = {e for s in trainer.sessions for e in s.extras}
    if "chopped" in extras:
        from src.chop import merge_run

        for path in merge_run(trainer.run_dir):
            print(f"{path}: the segments merged back into continuous series (merged_rates, "
                  "merged_times; docs/your_data.md)")
    if "behaviour" in extras:
        from src.decode import decode_run, has_behaviour, report

        if any(has_behaviour(s.path) for s in trainer.sessions):
            try:
                result = decode_run(trainer.run_dir, plots=plots)
            except DataError as e:  # the run is complete; only the decoding is not
                print(f"note: no decoding: {e}", file=sys.stderr)
                return
            print("decoded from the rates (docs/decoding.md):\n" + report(result))


# -----------------------------------------------------------------------------
# the flags: every config field, its help the comment beside it


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(prog="python -m src.main", description=__doc__,
                   usage="%(prog)s [--flag VALUE ...]   (every flag is optional)")
    p.add_argument("--data", help="a session .h5 file, or a quoted glob of several: one "
                   "stitched model (default: every file in --data-dir)")
    p.add_argument("--ins", help="an insertion id: trains on <data-dir>/<ins>.h5")
    p.add_argument("--data-dir", default="data", help="folder of session files (default: data)")
    p.add_argument("--results-dir", default="results", help="where run folders go "
                   "(default: results)")
    p.add_argument("--run", help="run folder name (default: <session>_<date>_<time>; under "
                   "torchrun, which reads --run itself, say --run-name)")
    p.add_argument("--run-name", dest="run", help=argparse.SUPPRESS)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--no-plots", action="store_true", help="skip the figures")
    p.add_argument("--quiet", action="store_true", help="print the start and the end only, not "
                   "a line per evaluation")
    config_flags(p, "model (LFADSConfig in src/model.py)", LFADSConfig)
    config_flags(p, "training (TrainConfig in src/trainer.py)", TrainConfig)
    return p


def field_comments(cls) -> dict:
    """{field: the comment on its line in the dataclass' source}: each flag's help."""
    found = re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", inspect.getsource(cls), re.M)
    return dict(found)


def config_flags(p: argparse.ArgumentParser, title: str, cls) -> None:
    """--field-name for every field but the data sizes; --field_name too, unlisted."""
    g, comments = p.add_argument_group(title), field_comments(cls)
    choices = {"precision": ("fp32", "bf16"), "compile": ("auto", "on", "off")}
    for f in dataclasses.fields(cls):
        if f.name in DATA_SIZES:
            continue
        text = f"{comments[f.name]} (default: {f.default})".replace("%", "%%")
        flag, kw = "--" + f.name.replace("_", "-"), {"dest": f.name, "default": None}
        if f.type in (bool, "bool"):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, help=text, **kw)
            kind = parse_bool
        else:
            kind = type(f.default)
            metavar = "{auto,cpu,cuda,cuda:N,mps}" if f.name == "device" else kind.__name__.upper()
            g.add_argument(flag, type=kind, choices=choices.get(f.name), help=text,
                           metavar=None if f.name in choices else metavar, **kw)
        if "_" in f.name:
            g.add_argument("--" + f.name, type=kind, help=argparse.SUPPRESS, **kw)


def parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")


if __name__ == "__main__":
    sys.exit(main())
