"""`--resume RUN_DIR`: take a run back from its ckpt_last.pt and go on bit for bit.

A checkpoint (src/trainer.py, `Trainer.checkpoint`) holds the weights, AdamW's moments, the
scheduler, the loop's state, both configs, the session files and every process' random
states. Flags given with --resume override the saved settings; this module checks that the
data and the model asked for still fit the checkpoint, then restores it into a new Trainer.
"""

import glob
import os
import random
from dataclasses import asdict

import numpy as np
import torch

from src.data import DataError, find_session_files, load_session
from src.model import LFADS, LFADSConfig
from src.runs import check_settings, overrides, writable
from src.trainer import LoopState, TrainConfig

KEYS = {"model", "optimizer", "scheduler", "rng", "model_config", "train_config", "session"}
# optimiser settings that a new value on --resume replaces in the saved state:
# (param_group key, TrainConfig field)
OPTIMISER_SETTINGS = (("lr", "lr"), ("eps", "adam_eps"), ("weight_decay", "weight_decay"))


def resumed_run(args, lead: bool = True, n_proc: int = 1) -> tuple:
    """Sessions, configs, run folder and checkpoint of the run in --resume, checked against
    each other; flags given now override the checkpoint's settings."""
    ckpt_path = os.path.join(args.resume, "ckpt_last.pt")
    if not os.path.isfile(ckpt_path):
        raise DataError(f"--resume {args.resume}: no checkpoint {ckpt_path}")
    ckpt = load(ckpt_path)
    try:
        mcfg = LFADSConfig(**{**ckpt["model_config"], **overrides(args, LFADSConfig)})
        tcfg = TrainConfig(**{**ckpt["train_config"], **overrides(args, TrainConfig)})
    except TypeError as e:  # a field this version of the code does not have
        raise DataError(f"{ckpt_path}: its configuration does not fit this version of the "
                        f"code ({e})") from e
    check_settings(mcfg, tcfg, n_proc)
    saved = saved_sessions(ckpt)
    files = find_session_files(args.data, None, "") if args.data else saved
    if len(saved) > 1:  # each session has its own read-in and read-out: match them by name
        from src.stitch import match_sessions

        files = match_sessions(saved, files, ckpt_path)
    if len(files) > 1:
        from src.stitch import load_sessions

        sessions, sizes = load_sessions(files)
    else:
        sessions = [load_session(files[0])]
        sizes = sessions[0].sizes
    check_fits(ckpt, ckpt_path, mcfg, sizes, files)
    if lead:
        writable(args.resume)
        for tmp in glob.glob(os.path.join(args.resume, ".*.tmp")):  # left by a kill mid-save
            os.remove(tmp)
    return sessions, mcfg, tcfg, args.resume, ckpt


def load(path: str) -> dict:
    """Our own checkpoint file, or a DataError that names it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own file
    except Exception as e:  # truncated, not a torch file, or from an incompatible torch
        raise DataError(f"{path}: not a readable checkpoint: {e}") from e
    missing = KEYS - set(ckpt) if isinstance(ckpt, dict) else KEYS
    if missing or not ("loop" in ckpt or "step" in ckpt):
        raise DataError(f"{path}: not a checkpoint of this program (it has no "
                        f"{', '.join(sorted(missing or {'loop'}))})")
    if "loop" not in ckpt:  # saved before the loop's state was one record
        old = {"bad_evals": "stalled", "acc": "sums"}
        names = {f: f for f in asdict(LoopState())}
        ckpt["loop"] = {old.get(k, k): v for k, v in ckpt.items() if old.get(k, k) in names}
    return ckpt


def saved_sessions(ckpt: dict) -> list[str]:
    return ckpt["session"] if isinstance(ckpt["session"], list) else [ckpt["session"]]


def check_fits(ckpt: dict, ckpt_path: str, mcfg, sizes: dict, files: list[str]) -> None:
    """The data and the model asked for fit the checkpoint, or a DataError."""
    differ = {k: (getattr(mcfg, k), v) for k, v in sizes.items() if getattr(mcfg, k) != v}
    if differ:
        raise DataError(f"{', '.join(files)} does not fit the checkpoint {ckpt_path}: " + ", ".join(
            f"{k} {a} in the checkpoint, {b} in the data" for k, (a, b) in differ.items()))
    model = LFADS
    if mcfg.session_n_in:
        from src.stitch import StitchedLFADS as model
    shapes = {k: tuple(v.shape) for k, v in model(mcfg).state_dict().items()}
    if {k: tuple(v.shape) for k, v in ckpt["model"].items()} != shapes:
        diff = changes(ckpt["model_config"], mcfg)
        raise DataError(f"{ckpt_path}: its weights do not fit the model asked for" + (
            f" ({fmt(diff)}): resume without those flags, or start a new run" if diff else
            ": saved by another version of src/model.py?"))


def restore(tr, ckpt: dict, say=print) -> None:
    """Put a checkpoint's state into a Trainer built with the same model config."""
    tr.model.load_state_dict(ckpt["model"])
    tr.opt.load_state_dict(ckpt["optimizer"])
    tr.sched.load_state_dict(ckpt["scheduler"])
    apply_changed_settings(tr.opt, tr.sched, tr.tcfg, ckpt["train_config"])
    tr.state = LoopState(**ckpt["loop"])
    tr.state.sums = dict(tr.state.sums)
    tr.last_saved = tr.state.step
    rank, world = getattr(tr, "rank", 0), getattr(tr, "world", 1)
    rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
    if len(rngs) == world:
        set_rng_state(rngs[rank])
    else:  # another number of processes: fresh streams, so not the uninterrupted run
        torch.manual_seed(tr.tcfg.seed + tr.state.step + rank)
        say(f"note: the checkpoint was written by {len(rngs)} processes, this run has "
            f"{world}: random streams restart")
    if tr.state.rows:  # drop rows written after the checkpoint: the run goes on from there
        tr.write_metrics()
    diff = changes(ckpt["model_config"], tr.mcfg) | changes(ckpt["train_config"], tr.tcfg)
    say(f"resuming {tr.run_dir} at step {tr.state.step}" + (f" ({fmt(diff)})" if diff else ""))


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    cuda = gpu_state(rng.get("cuda"))
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)  # the current GPU's, the one this process trains on


def gpu_state(saved):
    """The saved GPU random state of this process' GPU, or None when there is none to take: no
    GPU now or then. A list holds one state per GPU that was visible at the save; a GPU past
    its end has none."""
    if saved is None or not torch.cuda.is_available():
        return None
    if isinstance(saved, torch.Tensor):
        return saved
    index = torch.cuda.current_device()
    return saved[index] if index < len(saved) else None


def apply_changed_settings(opt, sched, tc, saved: dict) -> None:
    """Optimiser and scheduler settings given anew on --resume take effect: their saved
    states would otherwise bring back the old ones. An unchanged lr keeps its decayed value."""
    for group in opt.param_groups:
        for key, name in OPTIMISER_SETTINGS:
            if saved.get(name) != getattr(tc, name):
                group[key] = getattr(tc, name)
    sched.factor, sched.patience = tc.lr_decay, tc.lr_patience
    sched.threshold = tc.plateau_tol
    sched.min_lrs = [tc.lr_min] * len(opt.param_groups)


def changes(old: dict, new) -> dict:
    """{field: (old, new)} for the fields of dataclass `new` that differ from `old`."""
    return {k: (old.get(k), v) for k, v in asdict(new).items() if old.get(k) != v}


def fmt(diff: dict) -> str:
    return ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
