"""Several processes (torchrun; DistributedDataParallel over gloo on CPU) train what one
process trains: the global batch is split across ranks and their gradients averaged."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from src.main import main
from tests.conftest import ROOT, TINY_MODEL
from tests.test_resume import assert_same_run, steps

# No random draws, so that one process and two see the same numbers: dropout and coordinated
# dropout off here, posterior noise set to zero by no_noise (in a real run each rank draws its
# own masks and samples for its own trials)
DETERMINISTIC = ["--dropout", "0", "--cd_rate", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def no_noise():
    torch.randn_like = lambda x, **kw: torch.zeros_like(x, **kw)
    torch.randn = lambda *shape, **kw: torch.zeros(*shape, **kw)


def worker(rank: int, port: int, argv: list, codes: str):
    """One of two processes, set up as torchrun sets them up."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    no_noise()
    code = main(argv)
    with open(os.path.join(codes, f"rank{rank}"), "w") as f:
        f.write(str(code))


# co_dim 0: an autonomous generator has an empty input matrix, which DDP must not wait for
@pytest.mark.parametrize("model", [[], ["--co_dim", "0"]], ids=["controller", "autonomous"])
def test_two_processes_train_what_one_process_trains(tiny_h5, tmp_path, monkeypatch, model):
    results = tmp_path / "results"
    argv = ["--data", str(tiny_h5), "--results-dir", str(results), "--max_steps", "6",
            "--eval_every", "3", "--no-plots", *TINY_MODEL, *DETERMINISTIC, *model]
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: torch.zeros_like(x, **kw))
    monkeypatch.setattr(torch, "randn", lambda *shape, **kw: torch.zeros(*shape, **kw))
    assert main([*argv, "--run", "one"]) == 0
    mp.spawn(worker, args=(free_port(), [*argv, "--run", "two"], str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["0", "0"]
    one, two = (torch.load(results / r / "ckpt_last.pt", weights_only=False)
                for r in ("one", "two"))
    assert one["loop"]["step"] == two["loop"]["step"] == 6
    for name, w in one["model"].items():  # the same to float rounding: sums in other orders
        torch.testing.assert_close(two["model"][name], w, rtol=1e-4, atol=1e-5, msg=name)
    assert one["model"].keys() == two["model"].keys()
    assert sorted(os.listdir(results / "one")) == sorted(os.listdir(results / "two"))
    rows = [[float(r["train_recon"]) for r in steps_rows] for steps_rows in
            (read(results / "one"), read(results / "two"))]
    torch.testing.assert_close(torch.tensor(rows[1]), torch.tensor(rows[0]), rtol=1e-4, atol=0)


def read(run_dir):
    from tests.test_train import read_metrics
    return read_metrics(run_dir)


def torchrun(cwd, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "-m", "src.main", *args]
    return subprocess.run(cmd, cwd=cwd, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)


def test_torchrun_trains_writes_once_and_resumes_exactly(tiny_h5, tmp_path):
    common = ["--data", str(tiny_h5), "--no-plots", *TINY_MODEL, "--eval_every", "4"]
    whole = torchrun(tmp_path, *common, "--run-name", "whole", "--max_steps", "8")
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout.count("done: results/whole") == 1  # rank 0 alone reports
    part = torchrun(tmp_path, *common, "--run-name", "part", "--max_steps", "4")
    assert part.returncode == 0, part.stderr
    ckpt = torch.load(tmp_path / "results/part/ckpt_last.pt", weights_only=False)
    assert len(ckpt["rng"]) == 2  # each rank's random state, for an exact resume
    more = torchrun(tmp_path, "--resume", "results/part", "--no-plots", "--max_steps", "8")
    assert more.returncode == 0, more.stderr
    assert steps(tmp_path / "results/part") == [4, 8]
    assert_same_run(tmp_path / "results/whole", tmp_path / "results/part")


def test_a_batch_that_does_not_split_evenly_is_refused(tiny_h5, tmp_path):
    r = torchrun(tmp_path, "--data", str(tiny_h5), "--no-plots", *TINY_MODEL,
                 "--batch_size", "15")
    assert r.returncode != 0
    assert "error: --batch-size 15 does not split evenly over 2 processes" in r.stderr
    assert not (tmp_path / "results").exists() or not os.listdir(tmp_path / "results")
