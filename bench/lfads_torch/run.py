"""Train lfads-torch on one of our session files for a given wall time; write its validation
rates where `python -m src.bench panel --reference DIR` reads them.

    bench/lfads_torch/.venv/bin/python bench/lfads_torch/run.py \\
        --data results/bench_panel/data/lorenz_small.h5 --minutes 3 --out results/lfads_torch

Runs in the environment of bench/lfads_torch/setup.sh, which installs the user's own
lfads-torch checkout; nothing of lfads-torch is part of this repository. The model is built
from the checkout's configs/model/nlb_mc_maze_small.yaml with the overrides in OVERRIDES (and
the data's sizes), trained by Lightning with lfads-torch's BasicDataModule until `--minutes`
of wall time have passed, and the best checkpoint (lowest smoothed validation reconstruction)
is sampled by lfads-torch's run_posterior_sampling (50 posterior samples). Its
`valid_output_params` are the Poisson means, expected counts per bin, as our `valid_rates`.

Writes <out>/<data file name>.h5 with `valid_rates` (trials, T_rec, N) and attributes
`minutes` (training wall time), `steps`, `epochs`, `valid_recon_sha1` (which data),
`lfads_torch` (the checkout and commit) and `config` (the model settings, JSON).
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from src.bench.panel import valid_counts_sha1  # noqa: E402
from src.utils import atomic_path  # noqa: E402

BASE_CONFIG = "configs/model/nlb_mc_maze_small.yaml"  # inside the lfads-torch checkout
# The architecture of lfads-torch's MC_Maze-small config, whose regularisation is left to a
# hyperparameter search (marked "sampled" there); here it is fixed at the values of its
# hand-set configs/model/nlb_mc_maze.yaml, one model for every dataset: the measuring stick
# is not tuned per dataset, just as our defaults are not
OVERRIDES = {
    "ic_enc_dim": 100, "ci_enc_dim": 80, "con_dim": 80, "co_dim": 4, "ic_dim": 100,
    "gen_dim": 100, "fac_dim": 40,
    "dropout_rate": 0.3,  # on the encoder input, the IC encoding and the generator output
    "kl_ic_scale": 1e-7, "kl_co_scale": 1e-7,  # per element of its mean-reduced loss
    "l2_gen_scale": 0.0, "l2_con_scale": 0.0,
    "lr_init": 4e-3,  # AdamW, no scheduler (lr_scheduler False in the base config)
}
CD_RATE = 0.3  # coordinated dropout, as in nlb_mc_maze.yaml's train_aug_stack
BATCH_SIZE = 64  # configs/datamodule/nlb_mc_maze_small.yaml
GRAD_CLIP = 200.0  # its configs/single.yaml trainer
N_SAMPLES = 50  # posterior samples averaged (its run_posterior_sampling default)


def data_sizes(path: str) -> dict:
    """The model sizes a session file implies, as lfads-torch's config names them."""
    with h5py.File(path, "r") as f:
        _, t_enc, n_in = f["train_encod_data"].shape
        _, t_rec, n_out = f["train_recon_data"].shape
        ext = f["train_ext_input"].shape[2] if "train_ext_input" in f else 0
    return {"encod_data_dim": n_in, "encod_seq_len": t_enc, "recon_seq_len": t_rec,
            "ext_input_dim": ext, "n_out": n_out}


def write_rates(path: str, rates: np.ndarray, attrs: dict) -> None:
    """The file src/bench/panel.py reads: `valid_rates` (trials, T_rec, N) and attributes."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("valid_rates", data=rates.astype(np.float32), compression="gzip")
        for k, v in attrs.items():
            f.attrs[k] = v


def checkout_of(module) -> tuple[str, str]:
    """The lfads-torch checkout a module was imported from, and its commit."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(module.__file__)))
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return repo, commit


def build_model(repo: str, sizes: dict):
    """lfads-torch's LFADS from the checkout's base config, the overrides and the data sizes."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = os.path.join(repo, BASE_CONFIG)
    if not os.path.isfile(path):
        raise SystemExit(f"error: the lfads-torch checkout {repo} has no {BASE_CONFIG}")
    cfg = OmegaConf.create({"model": OmegaConf.load(path)})  # its ${model.*} references
    m = cfg.model
    for k, v in {**OVERRIDES, **{k: v for k, v in sizes.items() if k != "n_out"}}.items():
        if k not in m:
            raise SystemExit(f"error: {path} has no '{k}': another version of lfads-torch?")
        m[k] = v
    m.readout.modules[0].out_features = sizes["n_out"]
    m.train_aug_stack.transforms[0].cd_rate = CD_RATE
    return instantiate(m), OmegaConf.to_container(m, resolve=True)


def train(model, datamodule, minutes: float, work: str):
    """Lightning training for `minutes` of wall time; returns the trainer."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    ckpt = ModelCheckpoint(dirpath=os.path.join(work, "checkpoints"),
                           monitor="valid/recon_smth", mode="min", save_top_k=1, save_last=True)
    trainer = pl.Trainer(max_time={"minutes": minutes}, max_epochs=-1, accelerator="cpu",
                         devices=1, gradient_clip_val=GRAD_CLIP, callbacks=[ckpt],
                         logger=CSVLogger(work, name="", version=""), log_every_n_steps=5,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model=model, datamodule=datamodule)
    return trainer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a session file (e.g. a panel dataset)")
    p.add_argument("--minutes", type=float, required=True, help="training wall time")
    p.add_argument("--out", default="results/lfads_torch",
                   help="folder of the rates files (--reference of the panel)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not os.path.isfile(args.data):
        raise SystemExit(f"error: --data {args.data}: no such file")
    if glob.has_magic(args.data):  # its data module globs the path
        raise SystemExit(f"error: --data {args.data}: the path may not contain * ? or [")
    try:
        import lfads_torch
        import pytorch_lightning as pl
        import torch
        from lfads_torch.datamodules import BasicDataModule
        from lfads_torch.post_run.analysis import run_posterior_sampling
    except ImportError as e:
        raise SystemExit(f"error: {e}. Run this with the Python of the environment that "
                         "bench/lfads_torch/setup.sh builds (docs/panel.md)") from e

    data = os.path.abspath(args.data)
    name = os.path.splitext(os.path.basename(data))[0]
    out_dir = os.path.abspath(args.out)
    work = os.path.join(out_dir, f"{name}_work")  # Lightning's checkpoints and logs
    shutil.rmtree(work, ignore_errors=True)  # an earlier run's checkpoints are not this run's
    os.makedirs(work)
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed)
    repo, commit = checkout_of(lfads_torch)
    model, config = build_model(repo, data_sizes(data))
    datamodule = BasicDataModule(datafile_pattern=data, batch_size=BATCH_SIZE)
    t0 = time.time()
    trainer = train(model, datamodule, args.minutes, work)
    minutes = (time.time() - t0) / 60
    # the best checkpoint; the last one when time ran out before the first validation
    best = trainer.checkpoint_callback.best_model_path or os.path.join(work, "checkpoints",
                                                                       "last.ckpt")
    if not os.path.isfile(best):
        raise SystemExit(f"error: no checkpoint after {minutes:.1f} min; give more --minutes")
    # its own checkpoint, which holds more than weights: weights_only=False
    model.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
    # run_posterior_sampling writes lfads_output_<data name>.h5 into the working directory
    os.chdir(work)
    run_posterior_sampling(model, datamodule, "lfads_output.h5", num_samples=N_SAMPLES)
    with h5py.File(os.path.join(work, f"lfads_output_{name}.h5"), "r") as f:
        rates = f["valid_output_params"][()]  # (trials, T_rec, N), Poisson means per bin
    path = os.path.join(out_dir, f"{name}.h5")
    write_rates(path, rates, {
        "minutes": minutes, "steps": trainer.global_step, "epochs": trainer.current_epoch,
        "valid_recon_sha1": valid_counts_sha1(data), "lfads_torch": f"{repo} @ {commit}",
        "config": json.dumps(config, default=str), "source": data})
    print(f"wrote {path}: {rates.shape} validation rates after {minutes:.1f} min, "
          f"{trainer.global_step} steps ({trainer.current_epoch} epochs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
