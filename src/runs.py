"""A run folder and its settings: the files src.main writes there, the session files a run
trained on (read back by src/chop.py, src/decode.py and src/resume.py), and the checks that
refuse settings which cannot train before a run folder exists.
"""

import dataclasses
import glob
import json
import math
import os

import torch

from src.data import DataError
from src.utils import atomic_write_text, bf16_support, check_writable, has_mps, pick_device

# read from the session files, not flags
DATA_SIZES = ("n_in", "n_out", "t_enc", "t_rec", "ext_dim", "session_n_in", "session_n_out")
# what --overwrite deletes first, so no stale best checkpoint or figure sits beside a new run
RUN_FILES = ("ckpt_last.pt", "ckpt_best.pt", "metrics.csv", "summary.json", "lfads_output*.h5",
             "curves.png", "rates*.png", "factors*.png", "inputs*.png", "truth*.png",
             "decoding.csv", "decoding.png")


def new_run_dir(run_dir: str, overwrite: bool) -> None:
    if os.path.exists(run_dir) and os.listdir(run_dir) and not overwrite:
        raise DataError(f"run folder {run_dir} exists: continue it with --resume {run_dir}, or "
                        "replace it with --overwrite")
    writable(run_dir)
    for pattern in RUN_FILES if overwrite else ():
        for path in glob.glob(os.path.join(run_dir, pattern)):
            os.remove(path)


def writable(run_dir: str) -> None:
    """The run folder made and writable now, not at the first checkpoint an hour later."""
    try:
        check_writable(run_dir)
    except OSError as e:
        raise DataError(f"cannot write the run folder {run_dir} ({e.strerror or e}: "
                        f"{e.filename or run_dir}); pick another place with --results-dir") from e


def write_config(run_dir: str, mcfg, tcfg, sessions: list) -> None:
    """config.json: both configs and the session file (a list when stitched), enough to
    rebuild the model."""
    paths = [s.path for s in sessions]
    cfg = {"model": dataclasses.asdict(mcfg), "train": dataclasses.asdict(tcfg),
           "data": paths if len(paths) > 1 else paths[0]}
    atomic_write_text(os.path.join(run_dir, "config.json"), json.dumps(cfg, indent=2) + "\n")


def output_name(session_path: str, several: bool) -> str:
    """lfads_output.h5, or lfads_output_<session>.h5 for each of several sessions."""
    name = os.path.splitext(os.path.basename(session_path))[0]
    return f"lfads_output_{name}.h5" if several else "lfads_output.h5"


def run_outputs(run_dir: str) -> list[tuple[str, str]]:
    """(session file, output file name) of each session a run folder trained on, from its
    config.json; a DataError when it is not a run folder."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise DataError(f"{run_dir}: no config.json: not a run folder of src.main")
    with open(path) as f:
        data = json.load(f).get("data")
    if not data:
        raise DataError(f"{path}: no 'data' key (the session file)")
    paths = [data] if isinstance(data, str) else data
    return [(p, output_name(p, len(paths) > 1)) for p in paths]


def overrides(args, cls) -> dict:
    """The fields of `cls` given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in DATA_SIZES and getattr(args, f.name) is not None}


def check_settings(mcfg, tcfg, n_proc: int = 1) -> None:
    """Settings that cannot train, refused before a run folder exists."""
    sizes = ["ic_enc_dim", "ic_dim", "gen_dim", "fac_dim"]
    sizes += ["ci_enc_dim", "con_dim"] if mcfg.co_dim > 0 else []
    for cfg, names in ((mcfg, sizes), (tcfg, ["batch_size", "eval_every"])):
        for k in names:
            if getattr(cfg, k) < 1:
                raise DataError(f"{flag(k)} {getattr(cfg, k)}: must be at least 1")
    if mcfg.co_dim < 0:
        raise DataError(f"--co-dim {mcfg.co_dim}: must be 0 (no controller) or more")
    for cfg in (mcfg, tcfg):
        for f in dataclasses.fields(cfg):
            if f.type in (float, "float"):
                check_float(f.name, getattr(cfg, f.name))
    if tcfg.batch_size % n_proc:  # equal shares, or the mean gradient is not the batch's
        raise DataError(f"--batch-size {tcfg.batch_size} does not split evenly over {n_proc} "
                        "processes")
    dev = tcfg.device.split(":")[0]
    if dev not in ("auto", "cpu", "cuda", "mps"):
        raise DataError(f"--device {tcfg.device}: expected auto, cpu, cuda (or cuda:N) or mps")
    if (dev == "cuda" and not torch.cuda.is_available()) or (dev == "mps" and not has_mps()):
        raise DataError(f"--device {tcfg.device}: this torch build sees no such device; "
                        "use --device auto or cpu")
    check_device(tcfg)


def check_device(tcfg) -> None:
    """The GPU of --device cuda:N exists, and the device can run --precision bf16."""
    if tcfg.device.startswith("cuda:"):
        n, index = torch.cuda.device_count(), tcfg.device[len("cuda:"):]
        if not index.isdigit() or int(index) >= n:
            raise DataError(f"--device {tcfg.device}: this machine has {n} GPU(s), cuda:0 to "
                            f"cuda:{n - 1}")
    if tcfg.precision == "bf16":
        device = pick_device(tcfg.device)
        why = bf16_support(device)
        if why:
            raise DataError(f"--precision bf16 on {device}: {why}; use --precision fp32")


def check_float(name: str, v: float) -> None:
    """Shares lie in [0, 1), these must be positive, lr_decay in (0, 1], the rest >= 0."""
    shares = ("dropout", "cd_rate", "sv_rate", "smoothing")
    positive = ("ic_prior_var", "co_prior_tau", "co_prior_nvar", "cell_clip", "lr", "adam_eps",
                "grad_clip")
    if not math.isfinite(v):
        raise DataError(f"{flag(name)} {v}: must be a finite number")
    if name in shares and not 0 <= v < 1:
        raise DataError(f"{flag(name)} {v:g}: must be at least 0 and below 1")
    if name in positive and not v > 0:
        raise DataError(f"{flag(name)} {v:g}: must be above 0")
    if name == "lr_decay" and not 0 < v <= 1:
        raise DataError(f"{flag(name)} {v:g}: must be above 0 and at most 1")
    if not v >= 0:
        raise DataError(f"{flag(name)} {v:g}: must be 0 or more")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")
