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
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from src.data import Session
from src.metrics import r2, region_bps
from src.model import LFADS, LFADSConfig
from src.stitch import pcr_init_readins, pick_batch
from src.utils import atomic_torch_save, atomic_write_text, autocast, from_rank0, stop_signals


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
    max_bad_steps: int = 5  # stop after this many steps in a row with a non-finite loss or
    #                         gradient; each is skipped, so the weights stay finite; 0 = never
    eval_every: int = 100  # steps between validation, metrics rows and checkpoints
    kl_start: int = 0  # steps before the KL weight starts to grow
    kl_steps: int = 400  # steps over which the KL weight grows linearly from 0 to 1
    l2_start: int = 0  # steps before the L2 weight starts to grow
    l2_steps: int = 400  # steps over which the L2 weight grows linearly from 0 to 1
    patience: int = 0  # stop after this many evaluations past the ramps without a better
    #                    selection loss (held-in validation reconstruction, or the sample-
    #                    validation cost with --sv_rate); 0 = never stop early
    n_samples: int = 50  # posterior samples averaged for lfads_output.h5; 0 = posterior means
    seed: int = 0  # seeds weights, batch order, dropout and sampling
    device: str = "auto"  # auto | cpu | cuda | mps
    threads: int = 0  # torch CPU threads; 0 = torch's default
    precision: str = "fp32"  # fp32 | bf16: bfloat16 autocast of the matrix products, for CPUs
    #                          with AVX512-BF16 or AMX and for GPUs (README, Performance)


def ramp(step: int, start: int, length: int) -> float:
    """0 until `start`, then linear to 1 over `length` steps (the KL and L2 warm-ups)."""
    if length <= 0:
        return float(step >= start)
    return min(max((step - start) / length, 0.0), 1.0)


def sv_mask(split, rate: float, seed: int) -> torch.Tensor | None:
    """The fixed sample-validation mask of a split's encoder input, (trials, T_enc, N_in) bool,
    True = held out; a function of the seed alone, so a resumed run holds out the same
    elements. None when rate is 0."""
    if rate <= 0:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.rand(split.encod.shape, generator=g) < rate


def batch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The trial order of one epoch, a function of (seed, epoch) alone: resuming at any step
    gives the same batches as an uninterrupted run."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def device_split(split, sv, device) -> dict:
    """A training split on the device, once: batches are index lookups."""
    d = {"encod": split.encod, "recon": split.recon, "ext": split.ext, "sv": sv}
    return {k: None if v is None else v.to(device) for k, v in d.items()}


class Trainer:
    def __init__(self, session: Session | list[Session], mcfg: LFADSConfig, tcfg: TrainConfig,
                 run_dir: str, device: torch.device):
        # several sessions: one stitched model (src/stitch.py); self.session is the first
        self.sessions = session if isinstance(session, list) else [session]
        self.session, self.mcfg, self.tcfg, self.run_dir, self.device = (
            self.sessions[0], mcfg, tcfg, run_dir, device)
        self.model = LFADS(mcfg).to(device)
        self.stitched = self.model.stitched
        # several processes (torchrun): each trains on its share of every batch and DDP
        # averages the gradients, so all hold the same weights; rank 0 alone writes files
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if \
            dist.is_initialized() else (0, 1)
        # a stitched step leaves the other sessions' read-ins and read-outs without gradient
        self.net = self.model if self.world == 1 else DistributedDataParallel(
            self.model, find_unused_parameters=self.stitched)
        # sample-validation masks: seeds seed, seed + 1 for the first session's train and
        # valid splits (as ever for one session), seed + 2, seed + 3 for the second, ...
        self.data = [device_split(s.train, sv_mask(s.train, mcfg.sv_rate, tcfg.seed + 2 * i),
                                  device) for i, s in enumerate(self.sessions)]
        self.train = self.data[0]
        self.sv_valids = [sv_mask(s.valid, mcfg.sv_rate, tcfg.seed + 2 * i + 1)
                          for i, s in enumerate(self.sessions)]
        self.sv_valid = self.sv_valids[0]
        for i, s in enumerate(self.sessions):
            self.model.init_readout_bias(s.train.recon.mean((0, 1)).to(device), i)
        if self.stitched:
            self.pcr_dims = pcr_init_readins(self.model, self.sessions)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tcfg.lr, eps=tcfg.adam_eps,
                                     weight_decay=tcfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.opt, factor=tcfg.lr_decay, patience=tcfg.lr_patience, min_lr=tcfg.lr_min)
        self.step, self.elapsed, self.rows = 0, 0.0, []
        self.best, self.bad_evals = math.inf, 0
        # sums of the loss terms since the last evaluation; in the checkpoint, so that a run
        # stopped between evaluations resumes with the same metrics rows
        self.acc = {}
        self.bad_in_a_row, self.last_saved = 0, None  # non-finite steps; step of ckpt_last.pt
        self.signum = 0  # the signal that stopped fit(), if one did

    # --- checkpoints -------------------------------------------------------------

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "step": self.step,
                "elapsed": self.elapsed, "best": self.best, "bad_evals": self.bad_evals,
                "rows": self.rows, "acc": self.rank_mean(self.acc),
                "bad_in_a_row": self.bad_in_a_row, "model_config": asdict(self.mcfg),
                "train_config": asdict(self.tcfg), "session": self.session_paths(),
                "rng": self.all_ranks(rng_state())}  # [rank 0's, rank 1's, ...]

    def load_state(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.apply_changed_settings(ckpt["train_config"])
        self.step, self.elapsed = ckpt["step"], ckpt["elapsed"]
        self.best, self.bad_evals, self.rows = ckpt["best"], ckpt["bad_evals"], ckpt["rows"]
        self.acc, self.bad_in_a_row = dict(ckpt.get("acc", {})), ckpt.get("bad_in_a_row", 0)
        self.last_saved = self.step
        rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank])
        else:  # another number of processes: fresh streams, so not the uninterrupted run
            torch.manual_seed(self.tcfg.seed + self.step + self.rank)
            if self.rank == 0:
                print(f"note: the checkpoint was written by {len(rngs)} processes, this "
                      f"run has {self.world}: random streams restart")

    def apply_changed_settings(self, saved: dict) -> None:
        """Optimiser and scheduler settings given anew on --resume take effect: their saved
        states would otherwise bring back the old ones. An unchanged lr keeps its decayed value."""
        tc = self.tcfg
        for group in self.opt.param_groups:
            for key, field in (("lr", "lr"), ("eps", "adam_eps"), ("weight_decay", "weight_decay")):
                if saved.get(field) != getattr(tc, field):
                    group[key] = getattr(tc, field)
        self.sched.factor, self.sched.patience = tc.lr_decay, tc.lr_patience
        self.sched.min_lrs = [tc.lr_min] * len(self.opt.param_groups)

    def session_paths(self) -> str | list[str]:
        return [s.path for s in self.sessions] if self.stitched else self.session.path

    def save(self, name: str) -> None:
        state = self.state()  # every rank: the random states are gathered
        if self.rank == 0:
            atomic_torch_save(state, os.path.join(self.run_dir, name))
        if name == "ckpt_last.pt":
            self.last_saved = self.step

    # --- several processes ---------------------------------------------------------------

    def all_ranks(self, obj) -> list:
        """[rank 0's obj, rank 1's, ...]; [obj] in a single process."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def agree(self, *flags: float) -> list:
        """The largest of each flag over all ranks. Ranks must take every decision (skip a
        step, stop) together, or one would wait forever for the others' gradients."""
        if self.world == 1:
            return list(flags)
        t = torch.tensor(flags, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def rank_mean(self, sums: dict) -> dict:
        """Loss sums averaged over ranks, so that every rank logs and schedules the same."""
        if self.world == 1:
            return sums
        keys = sorted(sums)
        t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return dict(zip(keys, (t / self.world).tolist()))

    # --- evaluation ----------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, split, batch_size: int = 512, sv=None, session: int = 0) -> dict:
        """Loss terms at one posterior sample (an honest ELBO estimate) and metrics of the
        rates at the posterior means, over a whole split. sv: the split's sample-validation
        mask, (trials, T_enc, N_in) bool or None; it hides elements from the encoders for the
        loss terms (recon_sv needs that), while the rates read the whole encoder input, as
        those of lfads_output.h5 and summary.json do."""
        self.model.eval()
        totals, rates = {}, []
        for i in range(0, len(split), batch_size):
            enc = split.encod[i : i + batch_size].to(self.device)
            rec = split.recon[i : i + batch_size].to(self.device)
            ext = None if split.ext is None else split.ext[i : i + batch_size].to(self.device)
            m = None if sv is None else sv[i : i + batch_size].to(self.device)
            with autocast(self.device, self.tcfg.precision):
                losses = self.model(enc, rec, ext, sample=True, sv_mask=m, session=session).losses
                # the rates from the whole encoder input, as in lfads_output.h5 and the summary
                out = self.model(enc, ext=ext, sample=False, session=session)
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + v.item() * len(enc)
            rates.append(torch.exp(out.log_rates).cpu().numpy())
        m = {k: v / len(split) for k, v in totals.items()}
        m.update(rate_metrics(np.concatenate(rates), split))
        return m

    # --- the loop ----------------------------------------------------------------------

    def train_step(self, idx, kl_w: float, l2_w: float, session: int = 0) -> dict | None:
        """One optimiser step on the trials `idx` of a session: the loss terms, or None when the
        loss or the gradient is not finite. Such a step is skipped: one NaN update would poison
        the weights and Adam's moments for good."""
        self.model.train()
        data = self.data[session]
        ext = None if data["ext"] is None else data["ext"][idx]
        sv = None if data["sv"] is None else data["sv"][idx]
        kw = {"session": session} if self.stitched else {}
        with autocast(self.device, self.tcfg.precision):
            out = self.net(data["encod"][idx], data["recon"][idx], ext, sv_mask=sv, **kw)
        loss = self.model.total_loss(out.losses, kl_w, l2_w)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.grad_clip)
        total = loss.item()
        bad, = self.agree(not (math.isfinite(total) and math.isfinite(norm.item())))
        if bad:
            return None
        self.opt.step()
        return {"total": total, **{k: v.item() for k, v in out.losses.items()}}

    def ramps(self, step: int) -> tuple:
        tc = self.tcfg
        return ramp(step, tc.kl_start, tc.kl_steps), ramp(step, tc.l2_start, tc.l2_steps)

    def fit(self) -> str:
        """Train to max_steps; return why training stopped: "done", "early stopping", "time
        limit", "interrupted" (SIGINT or SIGTERM; ckpt_last.pt saved) or "diverged"
        (max_bad_steps non-finite steps in a row; ckpt_last.pt left as it was)."""
        tc = self.tcfg
        n_train = [len(s.train) for s in self.sessions]
        n = sum(n_train)  # epochs of a stitched run count trials of all sessions
        per_epoch = max(n // tc.batch_size, 1)  # full batches only: equal-sized steps
        ramps_end = max(tc.kl_start + tc.kl_steps, tc.l2_start + tc.l2_steps)
        t0, why, signum = time.time() - self.elapsed, "", 0
        last = max(self.step - 1, 0)  # for a run resumed at max_steps, which trains no step
        epoch, (kl_w, l2_w) = last // per_epoch, self.ramps(last)
        bar = tqdm(total=tc.max_steps, initial=self.step, desc="train", unit="step",
                   dynamic_ncols=True, disable=None if self.rank == 0 else True)
        # resumed after it stopped early or ran out of time: a larger --patience or
        # --max_minutes goes on, the same ones train no further step
        if tc.patience > 0 and self.bad_evals >= tc.patience:
            why = "early stopping"
        elif tc.max_minutes > 0 and self.elapsed > 60 * tc.max_minutes:
            why = "time limit"
        with stop_signals() as caught:
            while self.step < tc.max_steps and not why:
                epoch, pos = divmod(self.step, per_epoch)
                if self.stitched:
                    sess, idx = pick_batch(tc.seed, self.step, n_train, tc.batch_size)
                else:
                    order = batch_order(tc.seed, epoch, n)
                    sess, idx = 0, order[pos * tc.batch_size : (pos + 1) * tc.batch_size]
                idx = idx.tensor_split(self.world)[self.rank].to(self.device)  # this rank's share
                kl_w, l2_w = self.ramps(self.step)
                terms = self.train_step(idx, kl_w, l2_w, sess)
                self.bad_in_a_row = 0 if terms else self.bad_in_a_row + 1
                for k, v in (terms or {"bad": 1}).items():
                    self.acc[k] = self.acc.get(k, 0) + v
                self.acc["n"] = self.acc.get("n", 0) + (terms is not None)
                self.step += 1
                bar.update(1)
                self.elapsed = time.time() - t0
                early = False
                if self.step % tc.eval_every == 0:
                    acc, self.acc = self.acc, {}  # the checkpoint holds a complete period
                    early = self.end_of_period(acc, kl_w, l2_w, ramps_end, epoch)
                    bar.set_postfix_str(self.postfix())
                signum, out_of_time = self.agree(
                    caught["signum"], tc.max_minutes > 0 and self.elapsed > 60 * tc.max_minutes)
                why = self.stop_reason(early, int(signum), out_of_time)
            if self.acc and why != "diverged":  # stopped between two evaluations
                # checkpoint first: a resumed run goes on as if never stopped, without the
                # final row below (which steps no scheduler and no patience)
                self.save("ckpt_last.pt")
                if why != "interrupted":
                    self.end_of_period(dict(self.acc), kl_w, l2_w, ramps_end, epoch, final=True)
        bar.close()
        self.signum = caught["signum"] or int(signum)
        if why in ("early stopping", "time limit") and self.rank == 0:
            tqdm.write(f"stopping at step {self.step}: {why}")
        return why or "done"

    def stop_reason(self, early: bool, signum: int, out_of_time: bool) -> str:
        tc = self.tcfg
        if early:
            return "early stopping"
        if tc.max_bad_steps > 0 and self.bad_in_a_row >= tc.max_bad_steps:
            return "diverged"
        if signum:
            return "interrupted"
        if out_of_time:
            return "time limit"
        return ""

    def end_of_period(self, acc, kl_w, l2_w, ramps_end, epoch, final=False) -> bool:
        """Validate, log a metrics row, checkpoint, decay the lr; True to stop early. `final`:
        the shorter last period of a run that stops between evaluations: a row only (fit has
        saved ckpt_last.pt; the best checkpoint, the scheduler and patience count full periods,
        so that a resumed run equals an uninterrupted one)."""
        tc = self.tcfg
        acc = self.rank_mean(acc)
        n, bad = acc.pop("n"), acc.pop("bad", 0)
        row = {"step": self.step, "epoch": epoch, "elapsed_s": round(self.elapsed, 2),
               "lr": self.opt.param_groups[0]["lr"], "kl_weight": kl_w, "l2_weight": l2_w,
               "bad_steps": bad}  # skipped for a non-finite loss or gradient
        row.update({f"train_{k}": v / n for k, v in acc.items()})  # none if every step was bad
        # rank 0 evaluates, the others wait for its numbers: all then decide alike
        valid = from_rank0(self.evaluate_valid() if self.rank == 0 else None)
        valid["total"] = self.model.total_loss(valid, kl_w, l2_w)
        row.update({f"valid_{k}": v for k, v in valid.items()})
        self.rows.append(row)
        past_ramps = self.step >= ramps_end
        if past_ramps and not final:  # TF LFADS: decay when the training cost stalls
            self.sched.step(row.get("train_total", math.inf))
        score = valid[selection_key(self.mcfg)]
        improved = past_ramps and not final and score < self.best
        if improved:
            self.best, self.bad_evals = score, 0
        elif past_ramps and not final:
            self.bad_evals += 1
        self.write_metrics()
        if not final:
            self.save("ckpt_last.pt")
        if improved:
            self.save("ckpt_best.pt")
        return tc.patience > 0 and self.bad_evals >= tc.patience

    def evaluate_valid(self) -> dict:
        """Validation metrics; for stitched sessions overall and each session's (over_sessions:
        the best checkpoint and early stopping follow the overall selection term)."""
        if not self.stitched:
            return self.evaluate(self.session.valid, sv=self.sv_valid)
        return over_sessions(self.sessions, [
            self.evaluate(s.valid, sv=sv, session=i)
            for i, (s, sv) in enumerate(zip(self.sessions, self.sv_valids))])

    def postfix(self) -> str:
        r = self.rows[-1]
        s = f"recon {r['valid_recon']:.1f} co-bps {r.get('valid_co_bps', float('nan')):.3f}"
        return s + (f" R2 {r['valid_r2']:.3f}" if "valid_r2" in r else "")

    def write_metrics(self) -> None:
        if self.rank:
            return
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(os.path.join(self.run_dir, "metrics.csv"), buf.getvalue())


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


LOSS_TERMS = ("recon", "recon_heldin", "recon_sv", "kl_ic", "kl_co", "l2")  # nats per trial


def selection_key(mcfg: LFADSConfig) -> str:
    """The validation loss term that picks ckpt_best.pt and stops early. It never holds what the
    summary reports: held-out neurons (co-bps), forward-prediction bins (fp-bps), ground truth
    (R2). With sample validation, the cost of the held-in elements the encoders never saw;
    without, the reconstruction of held-in neurons over encoder bins."""
    return "recon_sv" if mcfg.sv_rate > 0 else "recon_heldin"


def over_sessions(sessions: list[Session], each: list[dict]) -> dict:
    """Validation metrics of stitched sessions, `each` one dict per session: overall ones
    first (loss terms per trial over all the sessions' trials, the other metrics the mean over
    the sessions that have them), then each session's under '<name>_<key>'."""
    n = np.array([len(s.valid) for s in sessions], float)
    out = {}
    for key in dict.fromkeys(k for m in each for k in m):
        vals = [m.get(key, np.nan) for m in each]
        out[key] = float(np.dot(vals, n) / n.sum() if key in LOSS_TERMS else np.nanmean(vals))
    for s, m in zip(sessions, each):
        out.update({f"{s.name}_{k}": v for k, v in m.items()})
    return out


def rate_metrics(rates, split) -> dict:
    """Bits per spike by region and, with ground truth, R2 of rates (all and held-out). The
    region sizes come from the split: stitched sessions differ in them."""
    n_in, t_enc = split.encod.shape[2], split.encod.shape[1]
    m = region_bps(rates, split.recon.numpy(), n_in, t_enc)
    if split.truth is not None:
        m["r2"], m["r2_pooled"] = r2(rates, split.truth)
        if split.truth.shape[2] > n_in:
            m["r2_heldout"], _ = r2(rates[..., n_in:], split.truth[..., n_in:])
    return m


def write_config(run_dir: str, mcfg: LFADSConfig, tcfg: TrainConfig,
                 sessions: Session | list[Session]) -> None:
    paths = [s.path for s in sessions] if isinstance(sessions, list) else sessions.path
    cfg = {"model": asdict(mcfg), "train": asdict(tcfg), "data": paths}
    atomic_write_text(os.path.join(run_dir, "config.json"), json.dumps(cfg, indent=2) + "\n")
