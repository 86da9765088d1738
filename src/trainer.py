"""The training loop: ramps, Adam, clipping, evaluation, checkpoints, resume."""

import csv
import io
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from src.data import Session
from src.metrics import r2, region_bps
from src.model import LFADS, LFADSConfig
from src.utils import atomic_torch_save, atomic_write_text


@dataclass
class TrainConfig:
    batch_size: int = 128  # trials per step
    lr: float = 2e-3  # Adam learning rate (lfads-torch MC_Maze: 4e-3; TF LFADS: 1e-2); 4e-3
    #                   was as good on the example data but noisier from one evaluation to the next
    adam_eps: float = 1e-8  # Adam epsilon (TF LFADS used 0.1 with its summed loss)
    weight_decay: float = 0.0  # AdamW decoupled weight decay, per step
    grad_clip: float = 200.0  # max global gradient norm (TF LFADS and lfads-torch: 200)
    lr_decay: float = 0.95  # factor on the learning rate when the training loss stalls (TF)
    lr_patience: int = 6  # evaluations without a lower training loss before a decay (TF: 6)
    lr_min: float = 1e-5  # the learning rate never decays below this
    max_steps: int = 1200  # optimiser steps
    max_minutes: float = 0.0  # stop early after this wall time; 0 = no limit
    eval_every: int = 100  # steps between validation, metrics rows and checkpoints
    kl_start: int = 0  # steps before the KL weight starts to grow
    kl_steps: int = 400  # steps over which the KL weight grows linearly from 0 to 1
    l2_start: int = 0  # steps before the L2 weight starts to grow
    l2_steps: int = 400  # steps over which the L2 weight grows linearly from 0 to 1
    patience: int = 0  # stop after this many evaluations past the ramps without a better
    #                    validation reconstruction; 0 = never stop early
    n_samples: int = 50  # posterior samples averaged for lfads_output.h5; 0 = posterior means
    seed: int = 0  # seeds weights, batch order, dropout and sampling
    device: str = "auto"  # auto | cpu | cuda | mps
    threads: int = 0  # torch CPU threads; 0 = torch's default


def ramp(step: int, start: int, length: int) -> float:
    """0 until `start`, then linear to 1 over `length` steps (the KL and L2 warm-ups)."""
    if length <= 0:
        return float(step >= start)
    return min(max((step - start) / length, 0.0), 1.0)


def batch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The trial order of one epoch, a function of (seed, epoch) alone: resuming at any step
    gives the same batches as an uninterrupted run."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class Trainer:
    def __init__(self, session: Session, mcfg: LFADSConfig, tcfg: TrainConfig, run_dir: str,
                 device: torch.device):
        self.session, self.mcfg, self.tcfg, self.run_dir, self.device = (
            session, mcfg, tcfg, run_dir, device)
        self.model = LFADS(mcfg).to(device)
        # data moved to the device once; batches are index lookups
        self.train = {k: v.to(device) if v is not None else None
                      for k, v in (("encod", session.train.encod), ("recon", session.train.recon),
                                   ("ext", session.train.ext))}
        self.model.init_readout_bias(session.train.recon.mean((0, 1)).to(device))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tcfg.lr, eps=tcfg.adam_eps,
                                     weight_decay=tcfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.opt, factor=tcfg.lr_decay, patience=tcfg.lr_patience, min_lr=tcfg.lr_min)
        self.step, self.elapsed, self.rows = 0, 0.0, []
        self.best, self.bad_evals = math.inf, 0

    # --- checkpoints -------------------------------------------------------------

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "step": self.step,
                "elapsed": self.elapsed, "best": self.best, "bad_evals": self.bad_evals,
                "rows": self.rows, "model_config": asdict(self.mcfg),
                "train_config": asdict(self.tcfg), "session": self.session.path,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                        "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                        else []}}

    def load_state(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.step, self.elapsed = ckpt["step"], ckpt["elapsed"]
        self.best, self.bad_evals, self.rows = ckpt["best"], ckpt["bad_evals"], ckpt["rows"]
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def save(self, name: str) -> None:
        atomic_torch_save(self.state(), os.path.join(self.run_dir, name))

    # --- evaluation ----------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, split, batch_size: int = 512) -> dict:
        """Loss terms at one posterior sample (an honest ELBO estimate) and metrics of the
        rates at the posterior means, over a whole split."""
        self.model.eval()
        totals, rates = {}, []
        for i in range(0, len(split), batch_size):
            enc = split.encod[i : i + batch_size].to(self.device)
            rec = split.recon[i : i + batch_size].to(self.device)
            ext = None if split.ext is None else split.ext[i : i + batch_size].to(self.device)
            for k, v in self.model(enc, rec, ext, sample=True).losses.items():
                totals[k] = totals.get(k, 0.0) + v.item() * len(enc)
            rates.append(torch.exp(self.model(enc, ext=ext, sample=False).log_rates).cpu().numpy())
        m = {k: v / len(split) for k, v in totals.items()}
        m.update(rate_metrics(np.concatenate(rates), split, self.mcfg))
        return m

    # --- the loop ----------------------------------------------------------------------

    def train_step(self, idx, kl_w: float, l2_w: float) -> dict:
        self.model.train()
        ext = None if self.train["ext"] is None else self.train["ext"][idx]
        out = self.model(self.train["encod"][idx], self.train["recon"][idx], ext)
        loss = self.model.total_loss(out.losses, kl_w, l2_w)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.grad_clip)
        self.opt.step()
        return {"total": loss.item(), **{k: v.item() for k, v in out.losses.items()}}

    def fit(self) -> None:
        tc = self.tcfg
        n = len(self.session.train)
        per_epoch = max(n // tc.batch_size, 1)  # full batches only: equal-sized steps
        ramps_end = max(tc.kl_start + tc.kl_steps, tc.l2_start + tc.l2_steps)
        acc, t0 = {}, time.time() - self.elapsed
        bar = tqdm(total=tc.max_steps, initial=self.step, desc="train", unit="step",
                   dynamic_ncols=True, disable=None)
        while self.step < tc.max_steps:
            epoch, pos = divmod(self.step, per_epoch)
            order = batch_order(tc.seed, epoch, n)
            idx = order[pos * tc.batch_size : (pos + 1) * tc.batch_size].to(self.device)
            kl_w = ramp(self.step, tc.kl_start, tc.kl_steps)
            l2_w = ramp(self.step, tc.l2_start, tc.l2_steps)
            for k, v in self.train_step(idx, kl_w, l2_w).items():
                acc[k] = acc.get(k, 0.0) + v
            acc["n"] = acc.get("n", 0) + 1
            self.step += 1
            bar.update(1)
            self.elapsed = time.time() - t0
            out_of_time = tc.max_minutes > 0 and self.elapsed > 60 * tc.max_minutes
            if self.step % tc.eval_every == 0 or self.step == tc.max_steps or out_of_time:
                stop = self.end_of_period(acc, kl_w, l2_w, ramps_end, epoch)
                bar.set_postfix_str(self.postfix())
                acc = {}
                if stop or out_of_time:
                    why = "time limit" if out_of_time else "no improvement (early stopping)"
                    tqdm.write(f"stopping at step {self.step}: {why}")
                    break
        bar.close()

    def end_of_period(self, acc, kl_w, l2_w, ramps_end, epoch) -> bool:
        """Validate, log a metrics row, checkpoint, decay the lr; True to stop early."""
        tc = self.tcfg
        n = acc.pop("n")
        row = {"step": self.step, "epoch": epoch, "elapsed_s": round(self.elapsed, 2),
               "lr": self.opt.param_groups[0]["lr"], "kl_weight": kl_w, "l2_weight": l2_w}
        row.update({f"train_{k}": v / n for k, v in acc.items()})
        valid = self.evaluate(self.session.valid)
        valid["total"] = self.model.total_loss(valid, kl_w, l2_w)
        row.update({f"valid_{k}": v for k, v in valid.items()})
        self.rows.append(row)
        past_ramps = self.step >= ramps_end
        if past_ramps:
            self.sched.step(row["train_total"])  # TF LFADS: decay when the training cost stalls
        improved = past_ramps and valid["recon"] < self.best
        if improved:
            self.best, self.bad_evals = valid["recon"], 0
        elif past_ramps:
            self.bad_evals += 1
        self.write_metrics()
        self.save("ckpt_last.pt")
        if improved:
            self.save("ckpt_best.pt")
        return tc.patience > 0 and self.bad_evals >= tc.patience

    def postfix(self) -> str:
        r = self.rows[-1]
        s = f"recon {r['valid_recon']:.1f} co-bps {r.get('valid_co_bps', float('nan')):.3f}"
        return s + (f" R2 {r['valid_r2']:.3f}" if "valid_r2" in r else "")

    def write_metrics(self) -> None:
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(os.path.join(self.run_dir, "metrics.csv"), buf.getvalue())


def rate_metrics(rates, split, mcfg: LFADSConfig) -> dict:
    """Bits per spike by region and, with ground truth, R2 of rates (all and held-out)."""
    m = region_bps(rates, split.recon.numpy(), mcfg.n_in, mcfg.t_enc)
    if split.truth is not None:
        m["r2"], m["r2_pooled"] = r2(rates, split.truth)
        if split.truth.shape[2] > mcfg.n_in:
            m["r2_heldout"], _ = r2(rates[..., mcfg.n_in :], split.truth[..., mcfg.n_in :])
    return m


def write_config(run_dir: str, mcfg: LFADSConfig, tcfg: TrainConfig, session: Session) -> None:
    cfg = {"model": asdict(mcfg), "train": asdict(tcfg), "data": session.path}
    atomic_write_text(os.path.join(run_dir, "config.json"), json.dumps(cfg, indent=2) + "\n")
