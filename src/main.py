"""Train LFADS on a session file and write a run folder.

    python -m src.main                       # the one session file in ./data
    python -m src.main --ins <pid>           # ./data/<pid>.h5
    python -m src.main --data path/to.h5 --gen_dim 100 --max_steps 500
    python -m src.main --resume results/<run>

Every field of LFADSConfig (src/model.py) and TrainConfig (src/trainer.py) is a flag.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from src.data import DataError, find_session_files, load_session
from src.infer import posterior_average, write_outputs
from src.model import LFADSConfig
from src.trainer import TrainConfig, Trainer, rate_metrics, write_config
from src.utils import atomic_write_text, pick_device, seed_everything

DATA_SIZES = ("n_in", "n_out", "t_enc", "t_rec", "ext_dim")  # read from the file, not flags


def parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m src.main", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a session .h5 file (default: the one file in --data-dir)")
    p.add_argument("--ins", help="an insertion id: trains on <data-dir>/<ins>.h5")
    p.add_argument("--data-dir", default="data", help="folder of session files (default: data)")
    p.add_argument("--results-dir", default="results", help="where run folders go")
    p.add_argument("--run", help="run folder name (default: <session>_<date>_<time>)")
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
                           help=f"(default: {f.default})")
    return p


def overrides(args, cls) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in DATA_SIZES and getattr(args, f.name) is not None}


def prepare_run(args):
    """Resolve configs, data and the run folder, new or resumed."""
    if args.resume:
        ckpt_path = os.path.join(args.resume, "ckpt_last.pt")
        if not os.path.isfile(ckpt_path):
            raise DataError(f"--resume {args.resume}: no checkpoint {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        mcfg = LFADSConfig(**{**ckpt["model_config"], **overrides(args, LFADSConfig)})
        tcfg = TrainConfig(**{**ckpt["train_config"], **overrides(args, TrainConfig)})
        session = load_session(args.data or ckpt["session"])
        if session.sizes != {k: getattr(mcfg, k) for k in DATA_SIZES}:
            raise DataError(f"{session.path}: sizes {session.sizes} do not match the "
                            f"checkpoint {ckpt_path}")
        return session, mcfg, tcfg, args.resume, ckpt
    files = find_session_files(args.data, args.ins, args.data_dir)
    if len(files) > 1:
        raise DataError(f"found {len(files)} session files ({', '.join(files)}); training on "
                        "several sessions at once is not supported yet: pick one with --ins "
                        "or --data")
    session = load_session(files[0])
    mcfg = LFADSConfig(**{**overrides(args, LFADSConfig), **session.sizes})
    tcfg = TrainConfig(**overrides(args, TrainConfig))
    run = args.run or f"{session.name}_{time.strftime('%Y%m%d_%H%M%S')}"
    run_dir = os.path.join(args.results_dir, run)
    if os.path.exists(run_dir) and os.listdir(run_dir) and not args.overwrite:
        raise DataError(f"run folder {run_dir} exists: continue it with --resume {run_dir}, or "
                        "replace it with --overwrite")
    os.makedirs(run_dir, exist_ok=True)
    return session, mcfg, tcfg, run_dir, None


def export(trainer, run_dir: str) -> dict:
    """Posterior-averaged outputs of the best checkpoint (the last if none is better)."""
    best = os.path.join(run_dir, "ckpt_best.pt")
    if os.path.isfile(best):
        ckpt = torch.load(best, map_location=trainer.device, weights_only=False)  # our own file
        trainer.model.load_state_dict(ckpt["model"])
    s, n = trainer.session, trainer.tcfg.n_samples
    splits = {"train": (s.train.encod, s.train.ext), "valid": (s.valid.encod, s.valid.ext)}
    if s.test_encod is not None:
        splits["test"] = (s.test_encod, None)
    outputs = {k: posterior_average(trainer.model, enc, ext, n, device=trainer.device)
               for k, (enc, ext) in splits.items()}
    write_outputs(os.path.join(run_dir, "lfads_output.h5"), outputs, n)
    return outputs


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        session, mcfg, tcfg, run_dir, ckpt = prepare_run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tcfg.threads > 0:
        torch.set_num_threads(tcfg.threads)
    device = pick_device(tcfg.device)
    seed_everything(tcfg.seed)
    trainer = Trainer(session, mcfg, tcfg, run_dir, device)
    if ckpt is not None:
        trainer.load_state(ckpt)
        print(f"resuming {run_dir} at step {trainer.step}")
    write_config(run_dir, mcfg, tcfg, session)
    print(f"training on {session.path}: {len(session.train)} train / {len(session.valid)} valid "
          f"trials, {mcfg.t_rec} bins of {session.bin_size * 1e3:g} ms, {mcfg.n_out} neurons "
          f"({mcfg.n_out - mcfg.n_in} held out); device {device}; run folder {run_dir}")
    trainer.fit()
    outputs = export(trainer, run_dir)
    summary = {"steps": trainer.step, "minutes": round(trainer.elapsed / 60, 2)}
    summary.update({f"valid_{k}": v for k, v in
                    rate_metrics(outputs["valid"]["rates"], session.valid, mcfg).items()})
    atomic_write_text(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    if not args.no_plots:
        from src import plots  # matplotlib is slow to import; only when drawing
        plots.make_all(run_dir, session, trainer.rows, outputs)
    print(f"done: {run_dir}, valid metrics of the posterior-averaged rates (best checkpoint):")
    print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
