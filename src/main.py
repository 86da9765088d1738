"""Train LFADS on a session file and write a run folder.

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
import glob
import json
import math
import os
import shlex
import sys
import time

import torch

from src.data import DataError, check_compatible, find_session_files, load_session
from src.infer import posterior_average, write_outputs
from src.model import LFADS, LFADSConfig
from src.stitch import stitched_sizes
from src.trainer import (
    LOSS_TERMS,
    TrainConfig,
    Trainer,
    over_sessions,
    rate_metrics,
    selection_key,
    write_config,
)
from src.utils import (
    atomic_write_text,
    check_writable,
    from_rank0,
    has_mps,
    init_distributed,
    pick_device,
    rank_device,
    remove_stale_temps,
    seed_everything,
    world,
)

# read from the files, not flags
DATA_SIZES = ("n_in", "n_out", "t_enc", "t_rec", "ext_dim", "session_n_in", "session_n_out")
CHOICES = {"precision": ("fp32", "bf16")}  # fields with a fixed set of values
CKPT_KEYS = {"model", "optimizer", "scheduler", "step", "rng", "model_config", "train_config",
             "session"}
# the validation metrics (src/trainer.py, src/metrics.py): stitched runs also log each
# session's as '<session>_<metric>', so no session may be named like a metric's first part
METRIC_NAMES = (*LOSS_TERMS, "total", "bps", "co_bps", "fp_bps", "r2", "r2_pooled", "r2_heldout")
# what --overwrite deletes first: a stale best checkpoint would be exported as the new run's,
# and old figures would sit next to the new outputs; the patterns cover a stitched run's
# lfads_output_<session>.h5 and rates_<session>.png too (src/plots.py names the figures)
RUN_FILES = ("ckpt_last.pt", "ckpt_best.pt", "metrics.csv", "summary.json", "lfads_output*.h5",
             "curves.png", "rates*.png", "factors*.png", "inputs*.png", "truth*.png")


def parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")


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
    for title, cls in (("model (src/model.py LFADSConfig)", LFADSConfig),
                       ("training (src/trainer.py TrainConfig)", TrainConfig)):
        g = p.add_argument_group(title)
        for f in dataclasses.fields(cls):
            if f.name in DATA_SIZES:
                continue
            kind = parse_bool if f.type in (bool, "bool") else type(f.default)
            g.add_argument(f"--{f.name}", f"--{f.name.replace('_', '-')}", dest=f.name, type=kind,
                           default=None, metavar=kind.__name__.upper(),
                           choices=CHOICES.get(f.name),
                           help=f"(default: {f.default})")
    return p


def overrides(args, cls) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in DATA_SIZES and getattr(args, f.name) is not None}


def load_checkpoint(path: str) -> dict:
    """Our own checkpoint file, or a DataError that names it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own file
    except Exception as e:  # truncated, not a torch file, or from an incompatible torch
        raise DataError(f"{path}: not a readable checkpoint: {e}") from e
    missing = CKPT_KEYS - set(ckpt) if isinstance(ckpt, dict) else CKPT_KEYS
    if missing:
        raise DataError(f"{path}: not a checkpoint of this program (it has no "
                        f"{', '.join(sorted(missing))})")
    return ckpt


def changes(old: dict, new) -> dict:
    """{field: (old, new)} for the fields of dataclass `new` that differ from `old`."""
    return {k: (old.get(k), v) for k, v in dataclasses.asdict(new).items() if old.get(k) != v}


def fmt(diff: dict) -> str:
    return ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())


def writable(run_dir: str) -> None:
    try:
        check_writable(run_dir)
    except OSError as e:
        raise DataError(f"cannot write the run folder {run_dir} ({e.strerror or e}: "
                        f"{e.filename or run_dir}); pick another place with --results-dir") from e


def load_sessions(files: list[str]):
    """One Session, or for several files a list of compatible ones, and their data sizes."""
    if len(files) == 1:
        session = load_session(files[0])
        return session, session.sizes
    sessions = [load_session(f) for f in files]
    check_compatible(sessions)
    names = [s.name for s in sessions]
    if len(set(names)) < len(names):  # outputs and metrics are named after the sessions
        raise DataError(f"several session files share a name: {', '.join(files)}")
    for s in sessions:  # each session's metrics are '<name>_<metric>' next to the overall ones
        clash = [k for k in METRIC_NAMES if k.startswith(s.name + "_")]
        if clash:
            raise DataError(f"{s.path}: a session named '{s.name}' would log metrics that read "
                            f"as the overall {clash[0]}; rename the file")
    return sessions, stitched_sizes(sessions)


def resume_run(args, lead: bool = True, n_proc: int = 1):
    """Configs, data and checkpoint of the run in --resume, checked against each other."""
    ckpt_path = os.path.join(args.resume, "ckpt_last.pt")
    if not os.path.isfile(ckpt_path):
        raise DataError(f"--resume {args.resume}: no checkpoint {ckpt_path}")
    ckpt = load_checkpoint(ckpt_path)
    try:
        mcfg = LFADSConfig(**{**ckpt["model_config"], **overrides(args, LFADSConfig)})
        tcfg = TrainConfig(**{**ckpt["train_config"], **overrides(args, TrainConfig)})
    except TypeError as e:  # a field this version of the code does not have
        raise DataError(f"{ckpt_path}: its configuration does not fit this version of the "
                        f"code ({e})") from e
    check_settings(mcfg, tcfg, n_proc)
    saved_files = ckpt["session"] if isinstance(ckpt["session"], list) else [ckpt["session"]]
    files = find_session_files(args.data, None, "") if args.data else saved_files
    if len(saved_files) > 1:  # each session has its own read-in and read-out: match by name
        files = match_sessions(saved_files, files, ckpt_path)
    session, sizes = load_sessions(files)
    differ = {k: (getattr(mcfg, k), v) for k, v in sizes.items() if getattr(mcfg, k) != v}
    if differ:
        raise DataError(f"{', '.join(files)} does not fit the checkpoint {ckpt_path}: " + ", ".join(
            f"{k} {a} in the checkpoint, {b} in the data" for k, (a, b) in differ.items()))
    saved = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
    if saved != {k: tuple(v.shape) for k, v in LFADS(mcfg).state_dict().items()}:
        diff = changes(ckpt["model_config"], mcfg)
        raise DataError(f"{ckpt_path}: its weights do not fit the model asked for" + (
            f" ({fmt(diff)}): resume without those flags, or start a new run" if diff else
            ": saved by another version of src/model.py?"))
    if lead:
        writable(args.resume)
        remove_stale_temps(args.resume)  # left by a kill during a save
    return session, mcfg, tcfg, args.resume, ckpt


def match_sessions(saved: list[str], given: list[str], ckpt_path: str) -> list[str]:
    """The given files in the checkpoint's session order, matched by file name (a session's
    name): the read-in and read-out of each session go with its name, not its place."""
    name = lambda f: os.path.splitext(os.path.basename(f))[0]  # noqa: E731
    by_name = {name(f): f for f in given}
    wanted = [name(f) for f in saved]
    if sorted(by_name) != sorted(wanted) or len(by_name) != len(given):
        raise DataError(f"{', '.join(given)} are not the sessions of the checkpoint "
                        f"{ckpt_path} ({', '.join(wanted)}): a stitched model's read-ins and "
                        "read-outs belong to sessions by file name; give those files")
    return [by_name[n] for n in wanted]


def check_settings(mcfg: LFADSConfig, tcfg: TrainConfig, n_proc: int) -> None:
    """Flags that cannot train, refused before a run folder exists."""
    sizes = ["ic_enc_dim", "ic_dim", "gen_dim", "fac_dim"]
    sizes += ["ci_enc_dim", "con_dim"] if mcfg.co_dim > 0 else []
    for cfg, names in ((mcfg, sizes), (tcfg, ["batch_size", "eval_every"])):
        for k in names:
            if getattr(cfg, k) < 1:
                raise DataError(f"--{k} {getattr(cfg, k)}: must be at least 1")
    if mcfg.co_dim < 0:
        raise DataError(f"--co_dim {mcfg.co_dim}: must be 0 (no controller) or more")
    for cfg in (mcfg, tcfg):
        check_floats(cfg)
    if tcfg.batch_size % n_proc:  # equal shares, or the averaged gradients are not the batch's
        raise DataError(f"--batch_size {tcfg.batch_size} does not split evenly over {n_proc} "
                        "processes")
    dev = tcfg.device.split(":")[0]
    if dev not in ("auto", "cpu", "cuda", "mps"):
        raise DataError(f"--device {tcfg.device}: expected auto, cpu, cuda (or cuda:N) or mps")
    if (dev == "cuda" and not torch.cuda.is_available()) or (dev == "mps" and not has_mps()):
        raise DataError(f"--device {tcfg.device}: this torch build sees no such device; "
                        "use --device auto or cpu")


# what each float setting allows, by rule (RULES); a float field not named here must be 0 or more
FLOAT_RULES = {
    "dropout": "share", "cd_rate": "share", "sv_rate": "share",  # a share of 1 leaves nothing
    "ic_prior_var": "positive", "co_prior_tau": "positive", "co_prior_nvar": "positive",
    "cell_clip": "positive", "lr": "positive", "adam_eps": "positive", "grad_clip": "positive",
    "lr_decay": "factor",
}
RULES = {"share": (lambda v: 0 <= v < 1, "must be at least 0 and below 1"),
         "positive": (lambda v: v > 0, "must be above 0"),
         "factor": (lambda v: 0 < v <= 1, "must be above 0 and at most 1"),
         "non-negative": (lambda v: v >= 0, "must be 0 or more")}


def check_floats(cfg) -> None:
    """Every float field of a config finite and in its range, or a DataError naming the flag."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.type not in (float, "float"):
            continue
        if not math.isfinite(v):
            raise DataError(f"--{f.name} {v}: must be a finite number")
        ok, what = RULES[FLOAT_RULES.get(f.name, "non-negative")]
        if not ok(v):
            raise DataError(f"--{f.name} {v:g}: {what}")


def prepare_run(args, lead: bool = True, n_proc: int = 1):
    """Resolve configs, data and the run folder, new or resumed. Only the lead process checks
    and creates the run folder."""
    if args.resume:
        return resume_run(args, lead, n_proc)
    files = find_session_files(args.data, args.ins, args.data_dir)
    session, sizes = load_sessions(files)
    mcfg = LFADSConfig(**{**overrides(args, LFADSConfig), **sizes})
    if mcfg.session_n_in and mcfg.readin_dim < 1:
        raise DataError(f"--readin_dim {mcfg.readin_dim}: several sessions need a shared "
                        "encoder input of at least 1 dimension")
    tcfg = TrainConfig(**overrides(args, TrainConfig))
    check_settings(mcfg, tcfg, n_proc)
    name = f"stitched{len(session)}" if isinstance(session, list) else session.name
    run = args.run or f"{name}_{time.strftime('%Y%m%d_%H%M%S')}"
    run_dir = os.path.join(args.results_dir, run)
    if not lead:
        return session, mcfg, tcfg, run_dir, None
    if os.path.exists(run_dir) and os.listdir(run_dir) and not args.overwrite:
        raise DataError(f"run folder {run_dir} exists: continue it with --resume {run_dir}, or "
                        "replace it with --overwrite")
    writable(run_dir)
    for pattern in RUN_FILES if args.overwrite else ():
        for path in glob.glob(os.path.join(run_dir, pattern)):
            os.remove(path)
    return session, mcfg, tcfg, run_dir, None


def output_name(trainer, session) -> str:
    """lfads_output.h5, or lfads_output_<session>.h5 for each of several sessions."""
    return f"lfads_output_{session.name}.h5" if trainer.stitched else "lfads_output.h5"


def export(trainer, run_dir: str) -> list[dict]:
    """Posterior-averaged outputs of the best checkpoint (the last if none is better), one
    {split: {field: array}} per session."""
    best = os.path.join(run_dir, "ckpt_best.pt")
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
        write_outputs(os.path.join(run_dir, output_name(trainer, s)), outputs, n)
        every.append(outputs)
    return every


def last_checkpoint(trainer) -> str:
    if trainer.last_saved is None:
        return "no checkpoint was written yet"
    return f"{trainer.run_dir}/ckpt_last.pt (step {trainer.last_saved}) is intact"


def prepare_ranks(args, rank: int, n_proc: int):
    """prepare_run on rank 0; the other processes of a torchrun job follow it into the same
    run folder, or stop with its error."""
    prepared, error = None, None
    if rank == 0:
        try:
            prepared = prepare_run(args, n_proc=n_proc)
        except DataError as e:
            error = str(e)
    error, run_dir = from_rank0((error, prepared and prepared[3]))
    if error:
        raise DataError(error)
    if rank > 0:
        args = argparse.Namespace(**{**vars(args), "results_dir": os.path.dirname(run_dir),
                                     "run": os.path.basename(run_dir)})
        prepared = prepare_run(args, lead=False, n_proc=n_proc)
    return prepared


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
            # gloo's threads torn down then aborted a rank once (SIGABRT after "done")
            gc.collect()
            torch.distributed.destroy_process_group()


def run(args, rank: int, n_proc: int) -> int:
    """Train and export; under torchrun every process runs this, rank 0 alone writes."""
    say = print if rank == 0 else lambda *a, **k: None
    try:
        session, mcfg, tcfg, run_dir, ckpt = prepare_ranks(args, rank, n_proc)
    except DataError as e:
        say(f"error: {e}", file=sys.stderr)
        return 2
    if tcfg.threads > 0:
        torch.set_num_threads(tcfg.threads)
    device = rank_device(pick_device(tcfg.device))
    seed_everything(tcfg.seed + rank)  # each process its own dropout masks and samples
    trainer = Trainer(session, mcfg, tcfg, run_dir, device)
    if ckpt is not None:
        trainer.load_state(ckpt)
        if trainer.rows:  # drop rows written after the checkpoint: the run goes on from there
            trainer.write_metrics()
        diff = changes(ckpt["model_config"], mcfg) | changes(ckpt["train_config"], tcfg)
        say(f"resuming {run_dir} at step {trainer.step}" + (f" ({fmt(diff)})" if diff else ""))
    if rank == 0:
        write_config(run_dir, mcfg, tcfg, session)
    procs = f" x {n_proc} processes" if n_proc > 1 else ""
    for s in trainer.sessions:
        n_in, n_out = s.sizes["n_in"], s.sizes["n_out"]
        say(f"training on {s.path}: {len(s.train)} train / {len(s.valid)} valid trials, "
            f"{mcfg.t_rec} bins of {s.bin_size * 1e3:g} ms, {n_out} neurons "
            f"({n_out - n_in} held out)")
    if trainer.stitched:
        say(f"one stitched model over {len(trainer.sessions)} sessions: read-ins to "
            f"{mcfg.readin_dim} shared dimensions ({trainer.pcr_dims} started by principal-"
            f"component regression; {'trained' if mcfg.readin_train else 'fixed'})")
    say(f"device {device}{procs}; run folder {run_dir}")
    launcher = f"torchrun --nproc_per_node={n_proc}" if n_proc > 1 else "python"
    resume = f"{launcher} -m src.main --resume {shlex.quote(run_dir)}"
    try:
        why = trainer.fit()
        done = rank == 0 and why not in ("interrupted", "diverged")
        outputs = export(trainer, run_dir) if done else None
    except (OSError, KeyboardInterrupt) as e:  # a full disk; a second Ctrl-C during a save
        say(f"error: {e or type(e).__name__} at step {trainer.step}; {last_checkpoint(trainer)}."
              f" Continue with: {resume}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    if why == "interrupted":
        say(f"interrupted at step {trainer.step}; continue with: {resume}", file=sys.stderr)
        return 128 + trainer.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    if why == "diverged":
        say(f"error: stopped at step {trainer.step}: {tcfg.max_bad_steps} steps in a row had a "
              "non-finite loss or gradient. They were skipped, so the weights stay finite; "
              f"{last_checkpoint(trainer)}. Lower --lr (now {trainer.opt.param_groups[0]['lr']:g})"
              f" or check the data, then continue with: {resume} --lr <lower>", file=sys.stderr)
        return 1
    if rank > 0:
        return 0
    summary = {"steps": trainer.step, "minutes": round(trainer.elapsed / 60, 2),
               "selected_on": f"valid_{selection_key(mcfg)}"}
    each = [rate_metrics(out["valid"]["rates"], s.valid)
            for s, out in zip(trainer.sessions, outputs)]
    valid = over_sessions(trainer.sessions, each) if trainer.stitched else each[0]
    summary.update({f"valid_{k}": v for k, v in valid.items()})
    atomic_write_text(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    if not args.no_plots:
        from src import plots  # matplotlib is slow to import; only when drawing
        if trainer.stitched:
            plots.make_all_stitched(run_dir, trainer.sessions, trainer.rows, outputs)
        else:
            plots.make_all(run_dir, session, trainer.rows, outputs[0])
    print(f"done: {run_dir}, valid metrics of the posterior-averaged rates (best checkpoint):")
    print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
