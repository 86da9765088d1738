"""The training loop: ramps, AdamW, clipping, evaluation, checkpoints, the stop at the plateau.

`Trainer.fit` is the loop. What keeps a long run safe sits around it in small helpers:
src/checkpoint.py saves and restores everything (exact resume), src/ranks.py holds the
collectives of several torchrun processes, src/data.py draws the batches (and the session of
each step when several are stitched), and src.utils.stop_signals turns Ctrl-C and SIGTERM into
a clean stop.
"""

import math
import os
import time
from dataclasses import dataclass
from enum import Enum

import torch
from tqdm import tqdm

from src import checkpoint
from src.data import Session, device_split, next_batch, steps_per_epoch, sv_mask
from src.infer import evaluate
from src.metrics import over_sessions, write_csv
from src.model import LFADS, LFADSConfig
from src.ranks import Ranks, from_rank0
from src.stitch import pcr_init_readins
from src.utils import atomic_torch_save, autocast, stop_signals


@dataclass
class TrainConfig:
    batch_size: int = 128  # trials per step
    lr: float = 2e-3  # Adam learning rate (lfads-torch MC_Maze: 4e-3; TF LFADS: 1e-2); 4e-3
    #                   was as good on the example data but noisier from one evaluation to the next
    adam_eps: float = 1e-8  # Adam epsilon (TF LFADS used 0.1 with its summed loss)
    weight_decay: float = 0.0  # AdamW decoupled weight decay, per step
    grad_clip: float = 200.0  # max global gradient norm (TF LFADS and lfads-torch: 200)
    lr_decay: float = 0.5  # factor on the learning rate when the smoothed selection loss
    #                        stalls for --lr_patience evaluations (after the ramps)
    lr_patience: int = 3  # evaluations without progress (see --plateau_tol) before a decay
    lr_min: float = 1e-5  # the learning rate never decays below this
    max_steps: int = 20000  # ceiling on optimiser steps; training normally stops earlier, at
    #                         the plateau (--patience)
    max_minutes: float = 0.0  # ceiling on training wall time in minutes; 0 = none
    max_bad_steps: int = 5  # stop after this many steps in a row with a non-finite loss or
    #                         gradient; each is skipped, so the weights stay finite; 0 = never
    eval_every: int = 100  # steps between validation, metrics rows and checkpoints
    # the ramps count epochs (passes over the training trials; lfads-torch: 80), so that a small
    # dataset, which over-fits within a few hundred steps, is selected from early on
    kl_start: float = 0.0  # epochs before the KL weight starts to grow
    kl_epochs: float = 50.0  # epochs over which the KL weight grows linearly from 0 to 1
    l2_start: float = 0.0  # epochs before the L2 weight starts to grow
    l2_epochs: float = 50.0  # epochs over which the L2 weight grows linearly from 0 to 1
    patience: int = 8  # stop at the plateau: after this many evaluations past the ramps
    #                    without progress of the smoothed selection loss (held-in validation
    #                    reconstruction, or the sample-validation cost with --sv_rate); 0 = never
    plateau_tol: float = 1e-3  # progress: the smoothed selection loss falls below its value
    #                            at the last progress by this share of it
    smoothing: float = 0.3  # weight of the past in the exponential smoothing of the selection
    #                         loss, one value per evaluation (lfads-torch's valid/recon_smth: 0.3)
    n_samples: int = 50  # posterior samples averaged for lfads_output.h5; 0 = posterior means
    seed: int = 0  # seeds weights, batch order, dropout and sampling
    device: str = "auto"  # auto | cpu | cuda | mps
    threads: int = 0  # torch CPU threads; 0 = torch's default
    precision: str = "fp32"  # fp32 | bf16: bfloat16 autocast of the matrix products, for CPUs
    #                          with AVX512-BF16 or AMX and for GPUs (docs/performance.md)


def ramp(epoch: float, start: float, length: float) -> float:
    """0 until `start`, then linear to 1 over `length` epochs (the KL and L2 warm-ups)."""
    if length <= 0:
        return float(epoch >= start)
    return min(max((epoch - start) / length, 0.0), 1.0)


class Stop(Enum):
    """Why training stopped: the exit code of `python -m src.main` (None: 128 + the signal,
    the shell's convention) and what the run prints, filled in by src/main.py."""
    PLATEAU = ("plateau", 0, "stopping at step {step}: the plateau (the smoothed selection "
               "loss made no progress of {tol:g} of it in {patience} evaluations)")
    MAX_STEPS = ("max_steps", 0, "stopping at step {step}: the --max_steps ceiling, before the "
                 "plateau; continue with: {resume} --max_steps <more>")
    TIME = ("max_minutes", 0, "stopping at step {step}: the --max_minutes ceiling, before the "
            "plateau; continue with: {resume} --max_minutes <more>")
    INTERRUPTED = ("interrupted", None, "interrupted at step {step}; continue with: {resume}")
    DIVERGED = ("diverged", 1, "error: stopped at step {step}: {bad} steps in a row had a "
                "non-finite loss or gradient. They were skipped, so the weights stay finite; "
                "{last}. Lower --lr (now {lr:g}) or check the data, then continue with: "
                "{resume} --lr <lower>")

    def __init__(self, label: str, code: int | None, message: str):
        self.label, self.code, self.message = label, code, message


def selection_key(mcfg: LFADSConfig) -> str:
    """The validation loss term that picks ckpt_best.pt and stops early. It never holds what the
    summary reports: held-out neurons (co-bps), forward-prediction bins (fp-bps), ground truth
    (R2). With sample validation, the cost of the held-in elements the encoders never saw;
    without, the reconstruction of held-in neurons over encoder bins."""
    return "recon_sv" if mcfg.sv_rate > 0 else "recon_heldin"


class Trainer:
    def __init__(self, sessions: list[Session], mcfg: LFADSConfig, tcfg: TrainConfig,
                 run_dir: str, device: torch.device):
        self.sessions, self.mcfg, self.tcfg = sessions, mcfg, tcfg
        self.run_dir, self.device = run_dir, device
        self.model = LFADS(mcfg).to(device)
        self.ranks = Ranks()
        self.net = self.ranks.wrap(self.model, len(sessions) > 1)  # what a training step calls
        # the sample-validation masks of session i's train and valid splits: seeds seed + 2i
        # and seed + 2i + 1
        self.data = [device_split(s.train, sv_mask(s.train, mcfg.sv_rate, tcfg.seed + 2 * i),
                                  device) for i, s in enumerate(sessions)]
        self.sv_valid = [sv_mask(s.valid, mcfg.sv_rate, tcfg.seed + 2 * i + 1)
                         for i, s in enumerate(sessions)]
        for i, s in enumerate(sessions):
            self.model.init_readout_bias(s.train.recon.mean((0, 1)).to(device), i)
        self.pcr_dims = pcr_init_readins(self.model, sessions) if len(sessions) > 1 else 0
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tcfg.lr, eps=tcfg.adam_eps,
                                     weight_decay=tcfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.opt, factor=tcfg.lr_decay, patience=tcfg.lr_patience, min_lr=tcfg.lr_min,
            threshold=tcfg.plateau_tol, threshold_mode="rel")
        self.step, self.elapsed, self.rows = 0, 0.0, []
        # the smoothed selection loss: its last value, its lowest (ckpt_best.pt), its value at
        # the last progress, and evaluations since that progress
        self.smoothed, self.best, self.mark, self.bad_evals = None, math.inf, math.inf, 0
        # sums of the loss terms since the last evaluation; in the checkpoint, so that a run
        # stopped between evaluations resumes with the same metrics rows
        self.acc = {}
        self.bad_in_a_row, self.last_saved = 0, None  # non-finite steps; step of ckpt_last.pt
        self.signum = 0  # the signal that stopped fit(), if one did

    # --- the loop ----------------------------------------------------------------------

    def fit(self) -> Stop:
        """Train to the plateau or a ceiling; evaluate and checkpoint every eval_every steps."""
        tc = self.tcfg
        n_train = [len(s.train) for s in self.sessions]
        t0, stop = time.time() - self.elapsed, self.stopped_before()
        bar = tqdm(total=tc.max_steps, initial=self.step, desc="train", unit="step",
                   dynamic_ncols=True, disable=None if self.ranks.lead else True)
        with stop_signals() as caught:
            while self.step < tc.max_steps and stop is None:
                session, idx = next_batch(tc.seed, self.step, n_train, tc.batch_size)
                idx = self.ranks.share(idx).to(self.device)
                terms = self.train_step(idx, *self.ramps(self.step), session)
                self.accumulate(terms)
                self.step += 1
                bar.update(1)
                self.elapsed = time.time() - t0
                early = False
                if self.step % tc.eval_every == 0:
                    early = self.end_of_period()
                    bar.set_postfix_str(self.postfix())
                stop = self.stop_reason(early, caught["signum"])
            self.close_period(stop)
        bar.close()
        self.signum = caught["signum"] or self.signum
        return stop or Stop.MAX_STEPS

    def train_step(self, idx, kl_w: float, l2_w: float, session: int = 0) -> dict | None:
        """One optimiser step on the trials `idx` of a session: the loss terms, or None when the
        loss or the gradient is not finite. Such a step is skipped: one NaN update would poison
        the weights and Adam's moments for good."""
        self.model.train()
        data = self.data[session]
        ext = None if data["ext"] is None else data["ext"][idx]
        sv = None if data["sv"] is None else data["sv"][idx]
        with autocast(self.device, self.tcfg.precision):
            out = self.net(data["encod"][idx], data["recon"][idx], ext, sv_mask=sv,
                           session=session)
        loss = self.model.total_loss(out.losses, kl_w, l2_w)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.grad_clip)
        total = loss.item()
        bad, = self.ranks.agree(not (math.isfinite(total) and math.isfinite(norm.item())))
        if bad:
            return None
        self.opt.step()
        return {"total": total, **{k: v.item() for k, v in out.losses.items()}}

    def end_of_period(self, final: bool = False) -> bool:
        """Validate, log a metrics row, checkpoint, decay the lr; True to stop early. `final`:
        the shorter last period of a run that stops between evaluations: a row only (fit has
        saved ckpt_last.pt; the best checkpoint, the scheduler and patience count full periods,
        so that a resumed run equals an uninterrupted one)."""
        acc, self.acc = self.ranks.mean(self.acc), {}
        kl_w, l2_w = self.ramps(max(self.step - 1, 0))
        row = self.period_row(acc, kl_w, l2_w)
        # rank 0 evaluates, the others wait for its numbers: all then decide alike
        valid = from_rank0(self.evaluate_valid() if self.ranks.lead else None)
        valid["total"] = self.model.total_loss(valid, kl_w, l2_w)
        row.update({f"valid_{k}": v for k, v in valid.items()})
        self.rows.append(row)
        full = self.step >= self.ramps_end() and not final  # counts for schedule and selection
        if not final:
            row["valid_selection_smth"] = self.smooth(valid[selection_key(self.mcfg)])
        improved = full and self.smoothed < self.best
        if full:
            self.sched.step(self.smoothed)  # decays the lr after lr_patience without progress
            self.best = min(self.best, self.smoothed)
            self.count_progress()
        self.write_metrics()
        if not final:
            self.save("ckpt_last.pt")
        if improved:
            self.save("ckpt_best.pt")
        return self.patience_spent()

    # --- helpers of the loop ---------------------------------------------------------------

    def smooth(self, score: float) -> float:
        """Exponential smoothing of the selection loss over evaluations: one posterior sample
        makes it jitter by about a nat per trial from one evaluation to the next."""
        a = self.tcfg.smoothing
        self.smoothed = score if self.smoothed is None else a * self.smoothed + (1 - a) * score
        return self.smoothed

    def count_progress(self) -> None:
        """Progress: the smoothed loss is below its value at the last progress by plateau_tol
        of it (a relative tolerance, like the scheduler's); else one more evaluation without."""
        if self.mark == math.inf or self.smoothed < self.mark - self.tcfg.plateau_tol * abs(
                self.mark):
            self.mark, self.bad_evals = self.smoothed, 0
        else:
            self.bad_evals += 1

    def steps_per_epoch(self) -> int:
        """Steps of one pass over the training trials of every session."""
        return steps_per_epoch(sum(len(s.train) for s in self.sessions), self.tcfg.batch_size)

    def ramps(self, step: int) -> tuple:
        tc, epoch = self.tcfg, step / self.steps_per_epoch()
        return ramp(epoch, tc.kl_start, tc.kl_epochs), ramp(epoch, tc.l2_start, tc.l2_epochs)

    def ramps_end(self) -> int:
        """The first step at which both weights are 1."""
        tc = self.tcfg
        end = max(tc.kl_start + tc.kl_epochs, tc.l2_start + tc.l2_epochs)
        return math.ceil(end * self.steps_per_epoch())

    def accumulate(self, terms: dict | None) -> None:
        """Add a step's loss terms to the period's sums; count a skipped step as bad."""
        self.bad_in_a_row = 0 if terms else self.bad_in_a_row + 1
        for k, v in (terms or {"bad": 1}).items():
            self.acc[k] = self.acc.get(k, 0) + v
        self.acc["n"] = self.acc.get("n", 0) + (terms is not None)

    def period_row(self, acc: dict, kl_w: float, l2_w: float) -> dict:
        """The training half of a metrics row: means of the period's loss terms."""
        n, bad = acc.pop("n"), acc.pop("bad", 0)
        row = {"step": self.step, "epoch": max(self.step - 1, 0) // self.steps_per_epoch(),
               "elapsed_s": round(self.elapsed, 2), "lr": self.opt.param_groups[0]["lr"],
               "kl_weight": kl_w, "l2_weight": l2_w,
               "bad_steps": bad}  # skipped for a non-finite loss or gradient
        row.update({f"train_{k}": v / n for k, v in acc.items()})  # none if every step was bad
        return row

    def stopped_before(self) -> Stop | None:
        """A run resumed after its plateau or its time ceiling stays stopped, unless a larger
        --patience or --max_minutes is given (fit's loop itself ends at --max_steps)."""
        if self.patience_spent():
            return Stop.PLATEAU
        return Stop.TIME if self.out_of_time() else None

    def patience_spent(self) -> bool:
        tc = self.tcfg
        return tc.patience > 0 and self.bad_evals >= tc.patience

    def out_of_time(self) -> bool:
        tc = self.tcfg
        return tc.max_minutes > 0 and self.elapsed > 60 * tc.max_minutes

    def stop_reason(self, early: bool, signum: int) -> Stop | None:
        """Whether to stop after this step; every rank decides alike."""
        tc = self.tcfg
        signum, out_of_time = self.ranks.agree(signum, self.out_of_time())
        self.signum = int(signum)
        if early:
            return Stop.PLATEAU
        if tc.max_bad_steps > 0 and self.bad_in_a_row >= tc.max_bad_steps:
            return Stop.DIVERGED
        if signum:
            return Stop.INTERRUPTED
        return Stop.TIME if out_of_time else None

    def close_period(self, stop: Stop | None) -> None:
        """A run stopped between two evaluations saves its checkpoint first, so that a resumed
        run goes on as if never stopped, then logs the short period in a final row (which steps
        no scheduler and no patience). A diverged run leaves ckpt_last.pt as it was."""
        if self.acc and stop is not Stop.DIVERGED:
            self.save("ckpt_last.pt")
            if stop is not Stop.INTERRUPTED:
                self.end_of_period(final=True)

    # --- evaluation ----------------------------------------------------------------

    def evaluate_valid(self) -> dict:
        """Validation metrics; for several sessions overall and each session's (over_sessions:
        the best checkpoint and the plateau stop follow the overall selection loss)."""
        each = [evaluate(self.model, s.valid, self.device, self.tcfg.precision, sv, session=i)
                for i, (s, sv) in enumerate(zip(self.sessions, self.sv_valid))]
        return each[0] if len(each) == 1 else over_sessions(self.sessions, each)

    # --- files ---------------------------------------------------------------------------

    def save(self, name: str) -> None:
        state = checkpoint.state(self)  # every rank: the random states are gathered
        if self.ranks.lead:
            atomic_torch_save(state, os.path.join(self.run_dir, name))
        if name == "ckpt_last.pt":
            self.last_saved = self.step

    def postfix(self) -> str:
        r = self.rows[-1]
        s = f"recon {r['valid_recon']:.1f} co-bps {r.get('valid_co_bps', float('nan')):.3f}"
        return s + (f" R2 {r['valid_r2']:.3f}" if "valid_r2" in r else "")

    def write_metrics(self) -> None:
        if self.ranks.lead:
            write_csv(os.path.join(self.run_dir, "metrics.csv"), self.rows)
