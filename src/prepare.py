"""Before training: the session files, the settings and the run folder, new or resumed.

Everything here is checked before a run folder is made or touched: a bad file, flag or
checkpoint ends the command with one `error:` line (tests/test_bad_input.py).
"""

import argparse
import glob
import os
import time

from src import checkpoint
from src.cli import check_settings, overrides
from src.data import DataError, check_compatible, find_session_files, load_session
from src.metrics import LOSS_TERMS
from src.model import LFADS, LFADSConfig
from src.ranks import from_rank0
from src.stitch import stitched_sizes
from src.trainer import TrainConfig
from src.utils import check_writable, remove_stale_temps

# the validation metrics: stitched runs also log each session's as '<session>_<metric>', so
# no session may be named like a metric's first part
METRIC_NAMES = (*LOSS_TERMS, "total", "bps", "co_bps", "fp_bps", "r2", "r2_pooled", "r2_heldout",
                "selection_smth")
# what --overwrite deletes first: a stale best checkpoint would be exported as the new run's,
# and old figures would sit next to the new outputs; the patterns cover a stitched run's
# lfads_output_<session>.h5 and rates_<session>.png too (src/plots.py names the figures)
RUN_FILES = ("ckpt_last.pt", "ckpt_best.pt", "metrics.csv", "summary.json", "lfads_output*.h5",
             "curves.png", "rates*.png", "factors*.png", "inputs*.png", "truth*.png")


def load_sessions(files: list[str]) -> tuple[list, dict]:
    """The sessions of the files (several must be compatible) and the model's data sizes."""
    sessions = [load_session(f) for f in files]
    if len(sessions) == 1:
        return sessions, sessions[0].sizes
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


def data_sized(given: dict, sizes: dict) -> dict:
    """Network sizes that follow the data unless given as flags: no more factors than the
    fewest neurons of a session (more would only add directions the read-out cannot tell
    apart; lfads-torch's configurations keep factors below the neuron count too)."""
    neurons = min(sizes.get("session_n_out") or [sizes["n_out"]])
    default = LFADSConfig.fac_dim
    if "fac_dim" not in given and default > neurons:
        return {**given, "fac_dim": neurons}
    return given


def writable(run_dir: str) -> None:
    try:
        check_writable(run_dir)
    except OSError as e:
        raise DataError(f"cannot write the run folder {run_dir} ({e.strerror or e}: "
                        f"{e.filename or run_dir}); pick another place with --results-dir") from e


def new_run(args, lead: bool = True, n_proc: int = 1):
    """Sessions, configs and run folder of a new run. Only the lead process checks and makes
    the run folder."""
    files = find_session_files(args.data, args.ins, args.data_dir)
    sessions, sizes = load_sessions(files)
    mcfg = LFADSConfig(**{**data_sized(overrides(args, LFADSConfig), sizes), **sizes})
    if mcfg.session_n_in and mcfg.readin_dim < 1:
        raise DataError(f"--readin_dim {mcfg.readin_dim}: several sessions need a shared "
                        "encoder input of at least 1 dimension")
    tcfg = TrainConfig(**overrides(args, TrainConfig))
    check_settings(mcfg, tcfg, n_proc)
    name = f"stitched{len(sessions)}" if len(sessions) > 1 else sessions[0].name
    run_dir = os.path.join(args.results_dir, args.run or f"{name}_{time.strftime('%Y%m%d_%H%M%S')}")
    if not lead:
        return sessions, mcfg, tcfg, run_dir, None
    if os.path.exists(run_dir) and os.listdir(run_dir) and not args.overwrite:
        raise DataError(f"run folder {run_dir} exists: continue it with --resume {run_dir}, or "
                        "replace it with --overwrite")
    writable(run_dir)
    for pattern in RUN_FILES if args.overwrite else ():
        for path in glob.glob(os.path.join(run_dir, pattern)):
            os.remove(path)
    return sessions, mcfg, tcfg, run_dir, None


def resumed_run(args, lead: bool = True, n_proc: int = 1):
    """Sessions, configs and checkpoint of the run in --resume, checked against each other;
    flags given now override the checkpoint's settings."""
    ckpt_path = os.path.join(args.resume, "ckpt_last.pt")
    if not os.path.isfile(ckpt_path):
        raise DataError(f"--resume {args.resume}: no checkpoint {ckpt_path}")
    ckpt = checkpoint.load(ckpt_path)
    try:
        mcfg = LFADSConfig(**{**ckpt["model_config"], **overrides(args, LFADSConfig)})
        tcfg = TrainConfig(**{**ckpt["train_config"], **overrides(args, TrainConfig)})
    except TypeError as e:  # a field this version of the code does not have
        raise DataError(f"{ckpt_path}: its configuration does not fit this version of the "
                        f"code ({e})") from e
    check_settings(mcfg, tcfg, n_proc)
    saved = checkpoint.saved_sessions(ckpt)
    files = find_session_files(args.data, None, "") if args.data else saved
    if len(saved) > 1:  # each session has its own read-in and read-out: match by name
        files = checkpoint.match_sessions(saved, files, ckpt_path)
    sessions, sizes = load_sessions(files)
    shapes = {k: tuple(v.shape) for k, v in LFADS(mcfg).state_dict().items()}
    checkpoint.check_fits(ckpt, ckpt_path, mcfg, sizes, files, shapes)
    if lead:
        writable(args.resume)
        remove_stale_temps(args.resume)  # left by a kill during a save
    return sessions, mcfg, tcfg, args.resume, ckpt


def prepare_run(args, lead: bool = True, n_proc: int = 1):
    return (resumed_run if args.resume else new_run)(args, lead, n_proc)


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
