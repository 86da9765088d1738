"""Checkpoints: what a run saves, how a resumed run takes it back, and what may change.

One self-describing file (ckpt_last.pt, ckpt_best.pt) holds the weights, AdamW's moments, the
learning-rate scheduler, the step, the bookkeeping of the loop, both configs, the session
files and every process' random states: a run resumed from it continues bit for bit as if it
had never stopped (tests/test_resume.py).
"""

import os
import random
from dataclasses import asdict

import numpy as np
import torch

from src.data import DataError

KEYS = {"model", "optimizer", "scheduler", "step", "rng", "model_config", "train_config",
        "session"}  # a file without these is not a checkpoint of this program
# optimiser and scheduler settings that a new value on --resume replaces in their saved state:
# (param_group key, TrainConfig field)
OPTIMISER_SETTINGS = (("lr", "lr"), ("eps", "adam_eps"), ("weight_decay", "weight_decay"))


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def state(tr) -> dict:
    """Everything a Trainer needs to go on; collective: every rank's random state is in it."""
    return {"model": tr.model.state_dict(), "optimizer": tr.opt.state_dict(),
            "scheduler": tr.sched.state_dict(), "step": tr.step, "elapsed": tr.elapsed,
            "best": tr.best, "bad_evals": tr.bad_evals,
            "smoothed": tr.smoothed, "mark": tr.mark, "rows": tr.rows,
            "acc": tr.ranks.mean(tr.acc), "bad_in_a_row": tr.bad_in_a_row,
            "model_config": asdict(tr.mcfg), "train_config": asdict(tr.tcfg),
            "session": [s.path for s in tr.sessions],
            "rng": tr.ranks.gather(rng_state())}  # [rank 0's, rank 1's, ...]


def restore(tr, ckpt: dict) -> None:
    """Put a checkpoint's state into a Trainer built with the same model config."""
    tr.model.load_state_dict(ckpt["model"])
    tr.opt.load_state_dict(ckpt["optimizer"])
    tr.sched.load_state_dict(ckpt["scheduler"])
    apply_changed_settings(tr.opt, tr.sched, tr.tcfg, ckpt["train_config"])
    tr.step, tr.elapsed = ckpt["step"], ckpt["elapsed"]
    tr.best, tr.bad_evals, tr.rows = ckpt["best"], ckpt["bad_evals"], ckpt["rows"]
    tr.smoothed, tr.mark = ckpt.get("smoothed"), ckpt.get("mark", tr.best)
    tr.acc, tr.bad_in_a_row = dict(ckpt.get("acc", {})), ckpt.get("bad_in_a_row", 0)
    tr.last_saved = tr.step
    rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
    if len(rngs) == tr.ranks.world:
        set_rng_state(rngs[tr.ranks.rank])
    else:  # another number of processes: fresh streams, so not the uninterrupted run
        torch.manual_seed(tr.tcfg.seed + tr.step + tr.ranks.rank)
        if tr.ranks.lead:
            print(f"note: the checkpoint was written by {len(rngs)} processes, this "
                  f"run has {tr.ranks.world}: random streams restart")


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


def load(path: str) -> dict:
    """Our own checkpoint file, or a DataError that names it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own file
    except Exception as e:  # truncated, not a torch file, or from an incompatible torch
        raise DataError(f"{path}: not a readable checkpoint: {e}") from e
    missing = KEYS - set(ckpt) if isinstance(ckpt, dict) else KEYS
    if missing:
        raise DataError(f"{path}: not a checkpoint of this program (it has no "
                        f"{', '.join(sorted(missing))})")
    return ckpt


def saved_sessions(ckpt: dict) -> list[str]:
    return ckpt["session"] if isinstance(ckpt["session"], list) else [ckpt["session"]]


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


def check_fits(ckpt: dict, ckpt_path: str, mcfg, sizes: dict, files: list[str],
               model_shapes: dict) -> None:
    """The data and the model asked for on --resume fit the checkpoint, or a DataError."""
    differ = {k: (getattr(mcfg, k), v) for k, v in sizes.items() if getattr(mcfg, k) != v}
    if differ:
        raise DataError(f"{', '.join(files)} does not fit the checkpoint {ckpt_path}: " + ", ".join(
            f"{k} {a} in the checkpoint, {b} in the data" for k, (a, b) in differ.items()))
    saved = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
    if saved != model_shapes:
        diff = changes(ckpt["model_config"], mcfg)
        raise DataError(f"{ckpt_path}: its weights do not fit the model asked for" + (
            f" ({fmt(diff)}): resume without those flags, or start a new run" if diff else
            ": saved by another version of src/model.py?"))


def changes(old: dict, new) -> dict:
    """{field: (old, new)} for the fields of dataclass `new` that differ from `old`."""
    return {k: (old.get(k), v) for k, v in asdict(new).items() if old.get(k) != v}


def fmt(diff: dict) -> str:
    return ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
