"""Nothing lost: a stopped run resumes exactly, a kill at any moment leaves a loadable
checkpoint, SIGINT and SIGTERM save and say how to go on, non-finite steps are skipped."""

import math
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from src.data import batch_order, load_session
from src.main import build_parser, main, overrides
from src.model import LFADS, LFADSConfig
from src.trainer import Stop, TrainConfig, Trainer
from tests.conftest import ROOT, TINY_MODEL
from tests.test_train import read_metrics


def train(tiny_h5, results, run, *flags):
    return main(["--data", str(tiny_h5), "--results-dir", str(results), "--run", run,
                 "--eval_every", "4", "--lr_patience", "0", "--no-plots", *TINY_MODEL, *flags])


def resume(run_dir, *flags):
    return main(["--resume", str(run_dir), "--no-plots", *flags])


def equal(a, b) -> bool:
    """Exact equality of nested checkpoint contents."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_run(a, b):
    """Same weights, optimiser, scheduler, RNG states, metrics rows and outputs, bit for bit."""
    ca, cb = (torch.load(d / "ckpt_last.pt", weights_only=False) for d in (a, b))
    for key in ca.keys() - {"loop"}:
        assert equal(ca[key], cb[key]), key
    for key in ca["loop"].keys() - {"elapsed", "rows"}:
        assert equal(ca["loop"][key], cb["loop"][key]), key
    no_time = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert no_time(read_metrics(a)) == no_time(read_metrics(b))
    with h5py.File(a / "lfads_output.h5") as fa, h5py.File(b / "lfads_output.h5") as fb:
        assert np.array_equal(fa["valid_rates"][()], fb["valid_rates"][()])


def steps(run_dir):
    return [int(r["step"]) for r in read_metrics(run_dir)]


# short ramps: the best checkpoint is kept from step 4 on, also across the stop at step 6
@pytest.mark.parametrize("ramps", [[], ["--kl_epochs", "1", "--l2_epochs", "1"]],
                         ids=["in_ramps", "past_ramps"])
def test_k_steps_plus_k_resumed_equal_2k_steps(tiny_h5, tmp_path, ramps):
    results = tmp_path / "results"
    assert train(tiny_h5, results, "whole", "--max_steps", "12", *ramps) == 0
    # 6 steps stop between two evaluations: the last row scores that shorter period, and the
    # checkpoint holds its loss sums so that the resumed run's rows are the uninterrupted ones
    assert train(tiny_h5, results, "split", "--max_steps", "6", *ramps) == 0
    assert steps(results / "split") == [4, 6]
    ckpt = torch.load(results / "split/ckpt_last.pt", weights_only=False)
    assert ckpt["loop"]["step"] == 6 and ckpt["loop"]["sums"]["n"] == 2
    if ramps:  # not the row at step 6, which scored a shorter period (see below)
        assert torch.load(results / "split/ckpt_best.pt", weights_only=False)["loop"]["step"] == 4
    assert resume(results / "split", "--max_steps", "12") == 0
    assert steps(results / "split") == [4, 8, 12]
    assert_same_run(results / "whole", results / "split")
    # the best checkpoint comes from full periods only: the row at step 6 scored a shorter
    # one, which the uninterrupted run never saw
    a, b = (torch.load(results / r / "ckpt_best.pt", weights_only=False)
            for r in ("whole", "split"))
    assert a["loop"]["step"] == b["loop"]["step"] and a["loop"]["step"] % 4 == 0
    assert equal(a["model"], b["model"])
    assert float(read_metrics(results / "whole")[-1]["kl_weight"]) == 1.0  # past the ramps


def test_ctrl_c_saves_mid_period_and_resumes_exactly(tiny_h5, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    assert train(tiny_h5, results, "whole", "--max_steps", "12") == 0
    real = Trainer.train_step

    def ctrl_c_in_step_7(self, *args):
        out = real(self, *args)
        if self.state.step == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_in_step_7)
    handler = signal.getsignal(signal.SIGINT)
    run = results / "split"
    assert train(tiny_h5, results, "split", "--max_steps", "12") == 130
    assert signal.getsignal(signal.SIGINT) is handler  # restored after training
    err = capsys.readouterr().err
    assert f"interrupted at step 7; continue with: python -m src.main --resume {run}" in err
    ckpt = torch.load(run / "ckpt_last.pt", weights_only=False)
    assert ckpt["loop"]["step"] == 7 and ckpt["loop"]["sums"]["n"] == 3 and steps(run) == [4]
    assert not (run / "lfads_output.h5").exists()
    monkeypatch.setattr(Trainer, "train_step", real)
    assert resume(run) == 0
    assert_same_run(results / "whole", run)


def wait_for_rows(run_dir, n, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, (run_dir.parent.parent / "err.txt").read_text()
        if (run_dir / "metrics.csv").exists() and len(read_metrics(run_dir)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} metrics rows in {timeout} s")


def start(cwd, *args):
    out, err = open(cwd / "out.txt", "w"), open(cwd / "err.txt", "w")
    return subprocess.Popen([sys.executable, "-m", "src.main", *args], stdout=out, stderr=err,
                            env=dict(os.environ, PYTHONPATH=ROOT), cwd=cwd)


def test_sigkill_sigterm_then_resume_to_the_end(tiny_h5, tmp_path):
    run = tmp_path / "results/r"
    # a checkpoint every step, so that the kill may land in the middle of writing one
    p = start(tmp_path, "--data", str(tiny_h5), "--run", "r", "--max_steps", "100000",
              "--eval_every", "1", "--no-plots", *TINY_MODEL)
    try:
        wait_for_rows(run, 3, p)
        p.kill()
        assert p.wait(60) == -signal.SIGKILL
        k = torch.load(run / "ckpt_last.pt", weights_only=False)["loop"]["step"]
        assert k >= 2  # metrics.csv is written just before the checkpoint
        p = start(tmp_path, "--resume", "results/r", "--no-plots")
        wait_for_rows(run, k + 2, p)
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 143
    finally:
        p.kill()
    err = (tmp_path / "err.txt").read_text()
    assert "Traceback" not in err
    s = int(re.search(r"interrupted at step (\d+); continue with: python -m src.main "
                      r"--resume results/r\n", err)[1])
    assert torch.load(run / "ckpt_last.pt", weights_only=False)["loop"]["step"] == s > k
    assert resume(run, "--max_steps", str(s + 2)) == 0
    assert steps(run) == list(range(1, s + 3))  # no row lost, none twice
    assert (run / "lfads_output.h5").is_file()
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]


def tiny_trainer(tiny_h5, run_dir, *flags):
    args = build_parser().parse_args([*TINY_MODEL, *flags])
    session = load_session(str(tiny_h5))
    mcfg = LFADSConfig(**{**overrides(args, LFADSConfig), **session.sizes})
    torch.manual_seed(0)
    os.makedirs(run_dir)
    return Trainer([session], mcfg, TrainConfig(**overrides(args, TrainConfig)), str(run_dir),
                   torch.device("cpu"))


def test_non_finite_steps_are_skipped_counted_and_leave_the_weights_alone(tiny_h5, tmp_path):
    tr = tiny_trainer(tiny_h5, tmp_path / "run", "--max_steps", "8", "--eval_every", "4")
    n, bs, seed = len(tr.sessions[0].train), tr.tcfg.batch_size, tr.tcfg.seed
    weights = lambda: {k: v.clone() for k, v in tr.model.state_dict().items()}  # noqa: E731
    first = batch_order(seed, 0, n)[:bs]
    bad = first[0].item()  # a NaN in this trial makes each batch that holds it non-finite
    tr.data["encod"] = tr.data["encod"].clone()
    tr.data["encod"][bad, 3, 0] = math.nan
    before = weights()
    assert tr.train_step(tr.data, first, 1.0, 1.0) is None
    assert equal(before, weights()) and not tr.opt.state  # nor has Adam seen it
    # a finite loss with an infinite gradient is skipped too
    clean = torch.tensor([i for i in range(n) if i != bad][:bs])
    hook = next(tr.model.parameters()).register_hook(lambda g: torch.full_like(g, math.inf))
    assert tr.train_step(tr.data, clean, 1.0, 1.0) is None and equal(before, weights())
    hook.remove()
    assert tr.train_step(tr.data, clean, 1.0, 1.0) is not None and not equal(before, weights())
    # in the loop: each batch holding the bad trial is skipped and counted in its row
    per_epoch = n // bs
    expected = [sum(bad in batch_order(seed, s // per_epoch, n)[(s % per_epoch) * bs:][:bs]
                    for s in range(a, a + 4)) for a in (0, 4)]
    assert tr.fit() is Stop.MAX_STEPS and tr.state.step == 8
    assert [r["bad_steps"] for r in tr.state.rows] == expected and expected[0] >= 1
    assert all(math.isfinite(r["train_total"]) for r in tr.state.rows)
    assert all(torch.isfinite(v).all() for v in tr.model.state_dict().values())


def test_diverging_run_stops_with_the_last_good_checkpoint_intact(tiny_h5, tmp_path,
                                                                   monkeypatch, capsys):
    results = tmp_path / "results"
    assert train(tiny_h5, results, "r", "--max_steps", "4") == 0
    run = results / "r"
    saved = (run / "ckpt_last.pt").read_bytes()
    real = LFADS.total_loss
    monkeypatch.setattr(LFADS, "total_loss", lambda self, *a: real(self, *a) * math.nan)
    capsys.readouterr()
    assert resume(run, "--max_steps", "100", "--max_bad_steps", "3") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: stopped at step 7: 3 steps in a row had a non-finite loss or "
                          "gradient") and "Traceback" not in err
    assert f"{run}/ckpt_last.pt (step 4) is intact" in err and "--lr" in err
    assert (run / "ckpt_last.pt").read_bytes() == saved


def test_optimiser_flags_given_on_resume_take_effect(tiny_h5, tmp_path):
    results = tmp_path / "results"
    assert train(tiny_h5, results, "r", "--max_steps", "4") == 0
    assert resume(results / "r", "--max_steps", "8", "--lr", "1e-4", "--adam_eps", "1e-6",
                  "--weight_decay", "0.01", "--lr_decay", "0.5", "--lr_min", "1e-6") == 0
    ckpt = torch.load(results / "r/ckpt_last.pt", weights_only=False)
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["eps"] == 1e-6 and group["weight_decay"] == 0.01
    assert group["lr"] in (1e-4, 0.5e-4)  # the new lr, decayed once at most (lr_patience 0)
    assert ckpt["scheduler"]["factor"] == 0.5 and ckpt["scheduler"]["min_lrs"] == [1e-6]
    assert float(read_metrics(results / "r")[-1]["lr"]) == group["lr"]


def test_a_run_stopped_early_or_out_of_time_stays_stopped_on_resume(tiny_h5, tmp_path):
    results = tmp_path / "results"
    flags = ["--max_steps", "200", "--patience", "1", "--kl_epochs", "1", "--l2_epochs", "1"]
    assert train(tiny_h5, results, "r", *flags) == 0
    done = steps(results / "r")
    assert done[-1] < 200  # it did stop early
    assert resume(results / "r") == 0
    assert steps(results / "r") == done
    # the same for a run out of time: 6 ms are spent after the first step
    assert train(tiny_h5, results, "t", "--max_steps", "200", "--max_minutes", "1e-4") == 0
    first = torch.load(results / "t/ckpt_last.pt", weights_only=False)["loop"]["step"]
    assert resume(results / "t") == 0
    assert torch.load(results / "t/ckpt_last.pt", weights_only=False)["loop"]["step"] == first < 200
