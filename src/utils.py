"""Small shared helpers: atomic writes, stop signals, seeding, devices."""

import contextlib
import glob
import hashlib
import os
import random
import shutil
import signal
import tempfile
import threading

import h5py
import numpy as np
import torch


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A crash, a kill or Ctrl-C at any moment leaves either the old file or the new one, never a
    half-written one: os.replace is atomic on POSIX and Windows within one file system.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj, path: str) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_copy(src: str, dst: str) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def remove_stale_temps(folder: str) -> None:
    """Delete the temporaries of atomic_path that a SIGKILL or power cut left behind."""
    for tmp in glob.glob(os.path.join(folder, ".*.tmp")):
        os.remove(tmp)


def check_writable(folder: str) -> None:
    """Create `folder` and a file in it now: a read-only place then fails before training,
    not at the first checkpoint an hour later. Raises OSError."""
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass


@contextlib.contextmanager
def stop_signals():
    """While inside, SIGINT (Ctrl-C) and SIGTERM (kill, cluster schedulers) only set
    caught["signum"]; the training loop checks it between steps, saves a checkpoint and stops.
    A second signal interrupts at once: checkpoints are replaced atomically, so even that
    loses only the steps since the last one."""
    caught = {"signum": 0}

    def handler(signum, frame):
        if caught["signum"]:
            raise KeyboardInterrupt
        caught["signum"] = signum

    if threading.current_thread() is not threading.main_thread():  # Python allows handlers
        yield caught  # only in the main thread; elsewhere signals keep their default action
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def autocast(device, precision: str):
    """bfloat16 matrix products inside the block when precision is "bf16": weights, recurrent
    states and the loss stay float32 (the model casts), only the products' inputs and outputs
    are rounded. A no-op for "fp32"."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision must be fp32 or bf16, not '{precision}'")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def has_mps() -> bool:
    """An Apple-silicon GPU that this torch build can use."""
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if has_mps():
        return torch.device("mps")
    return torch.device("cpu")


def valid_counts_sha1(path: str) -> str:
    """A fingerprint of a session file's validation counts: rates scored against a file must
    come from a model run on that same file (the panel and bench/lfads_torch/run.py check it)."""
    with h5py.File(path, "r") as f:
        return hashlib.sha1(np.ascontiguousarray(f["valid_recon_data"][()]).tobytes()).hexdigest()
