"""The command line's flags: every field of LFADSConfig and TrainConfig, checked before a run.

Each flag's --help is the comment beside its field in src/model.py or src/trainer.py, so those
comments are the one description of every setting.
"""

import argparse
import dataclasses
import inspect
import math
import re

import torch

from src.data import DataError
from src.model import LFADSConfig
from src.trainer import TrainConfig
from src.utils import has_mps

# read from the files, not flags
DATA_SIZES = ("n_in", "n_out", "t_enc", "t_rec", "ext_dim", "session_n_in", "session_n_out")
CHOICES = {"precision": ("fp32", "bf16")}  # fields with a fixed set of values
# what each float setting allows, by rule (RULES); a float field not named here must be 0 or more
FLOAT_RULES = {
    "dropout": "share", "cd_rate": "share", "sv_rate": "share",  # a share of 1 leaves nothing
    "ic_prior_var": "positive", "co_prior_tau": "positive", "co_prior_nvar": "positive",
    "cell_clip": "positive", "lr": "positive", "adam_eps": "positive", "grad_clip": "positive",
    "lr_decay": "factor", "smoothing": "share",
}
RULES = {"share": (lambda v: 0 <= v < 1, "must be at least 0 and below 1"),
         "positive": (lambda v: v > 0, "must be above 0"),
         "factor": (lambda v: 0 < v <= 1, "must be above 0 and at most 1"),
         "non-negative": (lambda v: v >= 0, "must be 0 or more")}


def parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")


def field_comments(cls) -> dict:
    """{field: the comment beside it in the dataclass' source}. A comment continues on lines
    of only a comment indented past its '#' ("#     more"); "# title" lines head a group."""
    out, name = {}, None
    for line in inspect.getsource(cls).splitlines():
        field = re.match(r"\s+(\w+): [^=]+=.*?#\s?(.*)$", line)
        more = re.match(r"\s+#\s{2,}(.*)$", line)
        if field:
            name, out[field[1]] = field[1], field[2].strip()
        elif more and name:  # a word broken with a hyphen at the line's end joins up again
            out[name] += ("" if out[name].endswith("-") else " ") + more[1].strip()
        else:
            name = None
    return out


def add_config_flags(p: argparse.ArgumentParser, title: str, cls) -> None:
    """--<field> (and --<field-with-dashes>) for every field that is not a data size."""
    g, comments = p.add_argument_group(title), field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in DATA_SIZES:
            continue
        kind = parse_bool if f.type in (bool, "bool") else type(f.default)
        text = comments.get(f.name, "").replace("%", "%%")
        g.add_argument(f"--{f.name}", f"--{f.name.replace('_', '-')}", dest=f.name, type=kind,
                       default=None, metavar=kind.__name__.upper(), choices=CHOICES.get(f.name),
                       help=f"{text} (default: {f.default})")


def overrides(args, cls) -> dict:
    """The fields of `cls` given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in DATA_SIZES and getattr(args, f.name) is not None}


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
