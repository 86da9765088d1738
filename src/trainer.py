"""The training loop: ramps, AdamW, clipping, validation, checkpoints, the stop at the plateau.

`Trainer.fit` is the loop and `LoopState` everything it carries from step to step; a run of
one session in one process uses this class as it stands. Several sessions (src/stitch.py's
`StitchedTrainer`) and several processes (src/distributed.py's) are subclasses that override
the small methods below `fit`; src/main.py's `build` picks one; src/resume.py restores state.
"""

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from enum import Enum

import torch
from tqdm import tqdm

from src import scan
from src.data import Session, device_split, next_batch, steps_per_epoch, sv_mask
from src.metrics import evaluate, write_csv
from src.model import LFADS, LFADSConfig
from src.utils import atomic_torch_save, autocast, rng_state, stop_signals


@dataclass
class TrainConfig:
    batch_size: int = 128  # trials per step (lfads-torch MC_Maze: 64)
    lr: float = 2e-3  # AdamW learning rate (lfads-torch MC_Maze: 4e-3; TF LFADS: 1e-2)
    adam_eps: float = 1e-8  # AdamW epsilon (TF LFADS: 0.1, on its summed loss)
    weight_decay: float = 0.0  # AdamW decoupled weight decay, per step
    grad_clip: float = 200.0  # largest global gradient norm (TF LFADS and lfads-torch: 200)
    lr_decay: float = 0.5  # factor on the learning rate when it decays (see --lr-patience)
    lr_patience: int = 3  # evaluations without progress the lr waits; it decays at the next one
    lr_min: float = 1e-5  # the learning rate never decays below this
    max_steps: int = 20000  # ceiling on optimiser steps; training normally stops at the plateau
    max_minutes: float = 0.0  # ceiling on training wall time in minutes; 0 = none
    max_bad_steps: int = 5  # stop after this many skipped non-finite steps in a row; 0 = never
    eval_every: int = 100  # steps between validation, metrics rows and checkpoints
    # the ramps count epochs, passes over the training trials (lfads-torch: 80), so that a
    # small dataset, which over-fits within a few hundred steps, is selected from early on
    kl_start: float = 0.0  # epochs before the KL weight starts to grow
    kl_epochs: float = 50.0  # epochs over which the KL weight grows linearly from 0 to 1
    l2_start: float = 0.0  # epochs before the L2 weight starts to grow
    l2_epochs: float = 50.0  # epochs over which the L2 weight grows linearly from 0 to 1
    patience: int = 8  # stop after this many evaluations without progress past the ramps; 0 = never
    plateau_tol: float = 1e-3  # progress: the smoothed selection loss falls by this share of itself
    smoothing: float = 0.3  # weight of the past in smoothing the selection loss (lfads-torch: 0.3)
    n_samples: int = 50  # posterior samples averaged for lfads_output.h5; 0 = posterior means
    seed: int = 0  # seeds weights, batch order, dropout and sampling
    device: str = "auto"  # where to train
    threads: int = 0  # torch CPU threads; 0 = torch's default
    precision: str = "fp32"  # bf16: bfloat16 matrix products (docs/performance.md)
    compile: str = "auto"  # torch.compile each recurrent step (src/scan.py): on, off, auto (GPUs)


def ramp(epoch: float, start: float, length: float) -> float:
    """0 until `start`, then linear to 1 over `length` epochs (the KL and L2 warm-ups)."""
    if length <= 0:
        return float(epoch >= start)
    return min(max((epoch - start) / length, 0.0), 1.0)


def adamw(params, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW updating every tensor in one fused kernel where torch has it (CPU from torch 2.4,
    CUDA), else in one call per operation over all tensors (foreach)."""
    params, kw = list(params), {"lr": tc.lr, "eps": tc.adam_eps, "weight_decay": tc.weight_decay}
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError):  # an older torch, or a device without the fused kernel
        return torch.optim.AdamW(params, foreach=True, **kw)


class Stop(Enum):
    """Why training stopped: (summary.json's label, the exit code; None: 128 + the signal)."""
    PLATEAU = ("plateau", 0)
    MAX_STEPS = ("max_steps", 0)
    TIME = ("max_minutes", 0)
    INTERRUPTED = ("interrupted", None)
    DIVERGED = ("diverged", 1)

    def __init__(self, label: str, code: int | None):
        self.label, self.code = label, code


def selection_key(mcfg: LFADSConfig) -> str:
    """The validation loss that picks ckpt_best.pt and stops at the plateau. It holds none of
    what the summary scores: held-out neurons (co-bps), forward-prediction bins (fp-bps),
    truth (R2). With sample validation, the cost of the held-in elements never trained on."""
    return "recon_sv" if mcfg.sv_rate > 0 else "recon_heldin"


@dataclass
class LoopState:
    """What the loop carries from one step to the next; a checkpoint saves it whole."""
    step: int = 0  # optimiser steps taken
    elapsed: float = 0.0  # seconds of training, over every resume
    rows: list = field(default_factory=list)  # metrics.csv, a dict per evaluation
    sums: dict = field(default_factory=dict)  # loss terms summed since the last evaluation
    bad_in_a_row: int = 0  # steps skipped in a row for a non-finite loss or gradient
    smoothed: float | None = None  # the smoothed selection loss
    best: float = math.inf  # its lowest: the loss of ckpt_best.pt
    mark: float = math.inf  # its value at the last progress
    stalled: int = 0  # evaluations since that progress


class Trainer:
    def __init__(self, sessions: list[Session], mcfg: LFADSConfig, tcfg: TrainConfig,
                 run_dir: str, device: torch.device):
        self.sessions, self.mcfg, self.tcfg = sessions, mcfg, tcfg
        self.run_dir, self.device = run_dir, device
        self.model = self.new_model().to(device)
        self.net = self.model  # what a training step calls: src/distributed.py wraps it
        self.setup_data()
        self.opt = adamw(self.model.parameters(), tcfg)
        scan.COMPILE["setting"] = tcfg.compile
        # the lr decays when the smoothed selection loss stalls, by the plateau's own measure
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.opt, factor=tcfg.lr_decay, patience=tcfg.lr_patience, min_lr=tcfg.lr_min,
            threshold=tcfg.plateau_tol, threshold_mode="rel")
        self.state = LoopState()
        self.lead = True  # this process writes the files (src/distributed.py: rank 0 alone)
        self.last_saved = None  # the step of ckpt_last.pt
        self.signum = 0  # the signal that stopped fit(), if one did
        self.bar = None  # the terminal's bar of fit(): the steps to the next evaluation
        self.log = None  # prints a line per evaluation (src/main.py's build: print); None: quiet
        self.draw = None  # draws curves.png from the metrics rows (src/main.py: src/plots.py's)
        self.drawn_s = 0.0  # seconds spent drawing curves.png so far

    def new_model(self) -> LFADS:
        return LFADS(self.mcfg)

    def setup_data(self) -> None:
        s, seed, rate = self.sessions[0], self.tcfg.seed, self.mcfg.sv_rate
        self.data = device_split(s.train, sv_mask(s.train, rate, seed), self.device)
        self.sv_valid = sv_mask(s.valid, rate, seed + 1)  # a fixed mask: seed alone picks it
        self.model.init_readout_bias(s.train.recon.mean((0, 1)).to(self.device))

    # --- the loop ----------------------------------------------------------------------

    def fit(self) -> Stop:
        """Train to the plateau or a ceiling; validate, log and checkpoint every eval_every."""
        tc, s = self.tcfg, self.state
        t0, stop = time.time() - s.elapsed, self.stopped_before()
        self.bar = tqdm(total=self.period_length(), desc="to the next evaluation", unit="step",
                        leave=False, dynamic_ncols=True,  # None: shown on a terminal only
                        disable=None if self.lead and self.log else True)
        with stop_signals() as caught:
            while stop is None and s.step < tc.max_steps:
                data, idx, kw = self.batch(s.step)
                terms = self.train_step(data, idx, *self.ramps(s.step), **kw)
                self.accumulate(terms)
                s.step, s.elapsed = s.step + 1, time.time() - t0
                self.bar.update(1)
                plateau = s.step % tc.eval_every == 0 and self.end_of_period()
                stop = self.stop_reason(plateau, caught["signum"])
            self.close_period(stop)
        self.bar.close()
        self.signum = caught["signum"] or self.signum
        return stop or Stop.MAX_STEPS

    def train_step(self, data: dict, idx, kl_w: float, l2_w: float, **kw) -> dict | None:
        """One optimiser step on trials `idx`: the loss terms, or None when the loss or the
        gradient is not finite. Such a step is skipped: one NaN update would poison the
        weights and AdamW's moments for good (the NaN guard)."""
        self.model.train()
        ext = None if data["ext"] is None else data["ext"][idx]
        sv = None if data["sv"] is None else data["sv"][idx]
        with autocast(self.device, self.tcfg.precision):
            out = self.net(data["encod"][idx], data["recon"][idx], ext, sv_mask=sv, **kw)
        loss = self.model.total_loss(out.losses, kl_w, l2_w)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.grad_clip,
                                              foreach=True)
        if not self.finite(loss.item(), norm.item()):
            return None
        self.opt.step()
        return {"total": loss.item(), **{k: v.item() for k, v in out.losses.items()}}

    def end_of_period(self, final: bool = False) -> bool:
        """Validate, log a metrics row, checkpoint, decay the lr; True at the plateau. `final`:
        the short last period of a run stopped between evaluations, a row only (the best
        checkpoint, the lr schedule and the plateau count take full periods, so that a
        resumed run equals an uninterrupted one)."""
        s = self.state
        kl_w, l2_w = self.ramps(max(s.step - 1, 0))
        row = self.period_row(self.period_sums(), kl_w, l2_w)
        s.sums = {}
        valid = self.validate()
        valid["total"] = self.model.total_loss(valid, kl_w, l2_w)
        row.update({f"valid_{k}": v for k, v in valid.items()})
        s.rows.append(row)
        full = s.step >= self.ramps_end() and not final
        if not final:
            row["valid_selection_smth"] = self.smooth(valid[selection_key(self.mcfg)])
        improved = full and s.smoothed < s.best
        if full:
            self.sched.step(s.smoothed)  # decays the lr after lr_patience without progress
            s.best = min(s.best, s.smoothed)
            self.count_progress()
        self.write_metrics()
        if not final:
            self.save("ckpt_last.pt")
        if improved:
            self.save("ckpt_best.pt")
        if self.lead and self.log:
            with tqdm.external_write_mode(file=sys.stdout):  # the line above the bar
                self.log(self.progress_line(row), flush=True)
        if self.lead and self.draw:
            self.draw_curves()
        if self.bar is not None:
            self.bar.reset(total=self.period_length())
        return self.patience_spent()

    # --- the pieces of the loop, which src/distributed.py and src/stitch.py extend --------

    def batch(self, step: int) -> tuple:
        """(the split on the device, the trials of this step, the model's extra arguments)."""
        tc = self.tcfg
        idx = next_batch(tc.seed, step, len(self.sessions[0].train), tc.batch_size)
        return self.data, idx.to(self.device), {}

    def finite(self, loss: float, norm: float) -> bool:
        return math.isfinite(loss) and math.isfinite(norm)

    def period_sums(self) -> dict:
        return dict(self.state.sums)

    def validate(self) -> dict:
        """Loss terms and metrics of the validation trials (src/metrics.py evaluate)."""
        return evaluate(self.model, self.sessions[0].valid, self.device, self.tcfg.precision,
                        self.sv_valid)

    def agree(self, signum: int, out_of_time: bool) -> tuple:
        return signum, out_of_time  # several processes decide together (src/distributed.py)

    def kw(self, session: int) -> dict:
        return {}  # the model's extra arguments for a session's trials

    def overall(self, each: list[dict]) -> dict:
        return each[0]  # the metrics of the run, from each session's

    # --- the plateau --------------------------------------------------------------------

    def smooth(self, score: float) -> float:
        """Exponential smoothing of the selection loss over evaluations: one posterior sample
        makes it jitter by about a nat per trial from one evaluation to the next."""
        s, a = self.state, self.tcfg.smoothing
        s.smoothed = score if s.smoothed is None else a * s.smoothed + (1 - a) * score
        return s.smoothed

    def count_progress(self) -> None:
        """Progress: the smoothed loss is below its value at the last progress by plateau_tol
        of it (relative, like the scheduler's threshold); else one more stalled evaluation."""
        s = self.state
        if s.mark == math.inf or s.smoothed < s.mark - self.tcfg.plateau_tol * abs(s.mark):
            s.mark, s.stalled = s.smoothed, 0
        else:
            s.stalled += 1

    def patience_spent(self) -> bool:
        return self.tcfg.patience > 0 and self.state.stalled >= self.tcfg.patience

    def out_of_time(self) -> bool:
        return self.tcfg.max_minutes > 0 and self.state.elapsed > 60 * self.tcfg.max_minutes

    def stopped_before(self) -> Stop | None:
        """A run resumed after its plateau or time ceiling stays stopped, unless given a larger
        --patience or --max-minutes (the loop itself ends at --max-steps)."""
        if self.patience_spent():
            return Stop.PLATEAU
        return Stop.TIME if self.out_of_time() else None

    def stop_reason(self, plateau: bool, signum: int) -> Stop | None:
        signum, out_of_time = self.agree(signum, self.out_of_time())
        self.signum = int(signum)
        bad = self.state.bad_in_a_row
        if plateau:
            return Stop.PLATEAU
        if self.tcfg.max_bad_steps > 0 and bad >= self.tcfg.max_bad_steps:
            return Stop.DIVERGED
        if signum:
            return Stop.INTERRUPTED
        return Stop.TIME if out_of_time else None

    def close_period(self, stop: Stop | None) -> None:
        """A run stopped between evaluations saves its checkpoint first, so that a resumed run
        goes on as if never stopped, then logs the short period in a final row. A diverged run
        leaves ckpt_last.pt as it was."""
        if self.state.sums and stop is not Stop.DIVERGED:
            self.save("ckpt_last.pt")
            if stop is not Stop.INTERRUPTED:
                self.end_of_period(final=True)

    # --- ramps and bookkeeping -----------------------------------------------------------

    def steps_per_epoch(self) -> int:
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
        s = self.state
        s.bad_in_a_row = 0 if terms else s.bad_in_a_row + 1
        for k, v in (terms or {"bad": 1}).items():
            s.sums[k] = s.sums.get(k, 0) + v
        s.sums["n"] = s.sums.get("n", 0) + (terms is not None)

    def period_row(self, sums: dict, kl_w: float, l2_w: float) -> dict:
        """The training half of a metrics row: means of the period's loss terms."""
        n, bad, s = sums.pop("n"), sums.pop("bad", 0), self.state
        row = {"step": s.step, "epoch": max(s.step - 1, 0) // self.steps_per_epoch(),
               "elapsed_s": round(s.elapsed, 2), "lr": self.opt.param_groups[0]["lr"],
               "kl_weight": kl_w, "l2_weight": l2_w, "bad_steps": bad}
        row.update({f"train_{k}": v / n for k, v in sums.items()})  # none if every step was bad
        return row

    def period_length(self) -> int:
        """Steps from now to the next evaluation, or to --max-steps if that comes first."""
        s, tc = self.state.step, self.tcfg
        return max(min(tc.eval_every - s % tc.eval_every, tc.max_steps - s), 0)

    def progress_line(self, r: dict) -> str:
        """An evaluation in a line: the training loss terms (means over the period), the
        validation selection loss and scores, the lr and the evaluations without progress."""
        s, tc, key = self.state, self.tcfg, selection_key(self.mcfg)
        train = " ".join(f"{k} {r[f'train_{k}']:.4g}" for k in ("recon", "kl_ic", "kl_co", "l2")
                         if f"train_{k}" in r)
        valid = f"{key} {r[f'valid_{key}']:.4g} co-bps {r.get('valid_co_bps', math.nan):.3f}"
        valid += f" R2 {r['valid_r2']:.3f}" if "valid_r2" in r else ""
        if s.step < self.ramps_end():  # the plateau counts only once the ramps are done
            wait = f"ramps {min(r['kl_weight'], r['l2_weight']):.0%}"
        else:
            wait = f"no progress {s.stalled}/{tc.patience or 'never'}"
        return (f"step {s.step} {r['elapsed_s'] / 60:.1f} min | train {train} | valid {valid} "
                f"| lr {r['lr']:.2g} | {wait}")

    def draw_curves(self) -> None:
        """curves.png redrawn, unless drawing has taken 1% of the training time so far: on a
        short evaluation period the figure comes every few evaluations instead."""
        if self.drawn_s > 0.01 * self.state.elapsed:
            return
        t0 = time.time()
        self.draw(self.state.rows, self.run_dir)
        self.drawn_s += time.time() - t0

    # --- files ---------------------------------------------------------------------------

    def checkpoint(self) -> dict:
        """Everything a run needs to go on bit for bit; src/resume.py takes it back."""
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "loop": asdict(self.state),
                "rng": [rng_state()], "model_config": asdict(self.mcfg),
                "train_config": asdict(self.tcfg), "session": [s.path for s in self.sessions]}

    def save(self, name: str) -> None:
        ckpt = self.checkpoint()
        if self.lead:
            atomic_torch_save(ckpt, os.path.join(self.run_dir, name))
        if name == "ckpt_last.pt":
            self.last_saved = self.state.step

    def write_metrics(self) -> None:
        if self.lead:
            write_csv(os.path.join(self.run_dir, "metrics.csv"), self.state.rows)
