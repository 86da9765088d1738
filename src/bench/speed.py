"""How fast is a training step? Times the model of src/model.py against src/reference.py.

    python -m src.bench speed                         # MC_Maze and quick-start sizes, this CPU
    python -m src.bench speed --configs mc_maze --threads 1 2 --steps 30
    python -m src.bench speed --device cuda
    python -m src.bench speed --compile on              # each recurrent step compiled

A training step is everything the trainer does per batch: forward with posterior sampling,
dropout and coordinated dropout, the loss, backward, gradient clipping and the AdamW step.
Inference is a forward pass with sampling, no gradient. Each is timed after warm-up steps (in
which --compile on compiles), one measurement per step, and reported as the median with the
10th-90th percentile spread. The FLOP rate counts only matrix products (formula below), and is
compared with the peak float32 matrix-multiply rate measured in the same run; the aten
operations of one training step are counted by torch.profiler, nested calls and views included.
"""

import argparse
import statistics
import time

import torch

from src import scan
from src.model import LFADS, LFADSConfig
from src.reference import reference_forward
from src.trainer import TrainConfig, adamw
from src.utils import FlagParser, autocast, synchronize

# lfads-torch's NLB MC_Maze configuration (docs/design.md, Model facts from the references):
# 35 encoder bins of 137 held-in neurons, 45 bins of 182 neurons reconstructed, batch 256,
# reference network sizes
CONFIGS = {
    "mc_maze": (LFADSConfig(n_in=137, n_out=182, t_enc=35, t_rec=45, gen_dim=200, fac_dim=100,
                            dropout=0.3), 256),
    "quickstart": (LFADSConfig(n_in=30, n_out=40, t_enc=40, t_rec=50), 128),
    "tiny": (LFADSConfig(n_in=6, n_out=8, t_enc=8, t_rec=10, ic_enc_dim=8, ci_enc_dim=8,
                         con_dim=8, co_dim=2, ic_dim=4, gen_dim=16, fac_dim=4), 4),
}
# ms per training step of lfads-torch at the MC_Maze configuration, measured on a 2-core CPU
# (torch 2.13, 2 threads; docs/performance.md). Quoted, not re-measured here: lfads-torch is
# not a dependency.
LFADS_TORCH_MS = 670.0

FLOP_FORMULA = """\
FLOPs counted: 2 x (multiply-adds of every matrix product), forward pass:
  encoders    2 encoders x 2 directions x T_enc x B x 3H x (N_in + H)           (IC and CI)
  controller  T_rec x B x [3H_con x (2 H_ci + F + H_con) + 2U x H_con]
  generator   T_rec x B x 3H_gen x (U + E + H_gen)  +  B x ic_dim x H_gen      (g_0)
  factors     T_rec x B x H_gen x F,   read-out  T_rec x B x F x N
  IC posterior B x 2H_ic x 2 ic_dim
a training step = 3 x forward (the backward pass costs two products per forward product)"""


def forward_flops(c: LFADSConfig, batch: int) -> float:
    """Matrix-product FLOPs of one forward pass (FLOP_FORMULA)."""
    enc = 2 * c.t_enc * 3 * (c.ic_enc_dim * (c.n_in + c.ic_enc_dim)
                             + (c.ci_enc_dim * (c.n_in + c.ci_enc_dim) if c.co_dim else 0))
    con = c.t_rec * (3 * c.con_dim * (2 * c.ci_enc_dim + c.fac_dim + c.con_dim)
                     + 2 * c.co_dim * c.con_dim) if c.co_dim else 0
    gen = c.t_rec * 3 * c.gen_dim * (c.co_dim + c.ext_dim + c.gen_dim) + c.ic_dim * c.gen_dim
    out = c.t_rec * (c.gen_dim * c.fac_dim + c.fac_dim * c.n_out)
    post = 2 * c.ic_enc_dim * 2 * c.ic_dim
    return 2.0 * batch * (enc + con + gen + out + post)


def matmul_peak(device, sizes=(1024, 2048), repeats=5) -> float:
    """Best float32 GFLOP/s of square matrix products: the machine's practical peak."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        a @ b
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            a @ b
            synchronize(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def fake_batch(c: LFADSConfig, batch: int, device):
    """Poisson counts at a few spikes per second in 10-20 ms bins, like real data."""
    g = torch.Generator().manual_seed(0)
    rates = torch.rand(batch, c.t_rec, c.n_out, generator=g) * 0.3
    recon = torch.poisson(rates, generator=g).to(device)
    return recon[:, : c.t_enc, : c.n_in].contiguous(), recon


def time_it(fn, device, steps: int, warmup: int) -> list:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1000 * (time.perf_counter() - t0))
    return times


def bench_one(c: LFADSConfig, batch: int, path: str, device, steps: int, warmup: int,
              precision: str) -> dict:
    torch.manual_seed(0)
    model = LFADS(c).to(device)
    run = model if path == "fast" else lambda *a, **k: reference_forward(model, *a, **k)

    def forward(*args, **kwargs):
        with autocast(device, precision):
            return run(*args, **kwargs)
    encod, recon = fake_batch(c, batch, device)
    opt = adamw(model.parameters(), TrainConfig(lr=1e-3))  # the trainer's optimiser

    def train_step():  # what Trainer.train_step does
        model.train()
        out = forward(encod, recon)
        loss = model.total_loss(out.losses, 1.0, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 200.0, foreach=True)
        opt.step()

    @torch.no_grad()
    def infer():
        model.eval()
        forward(encod, sample=True)

    train = time_it(train_step, device, steps, warmup)
    inf = time_it(infer, device, steps, max(1, warmup // 2))
    return {"train": train, "infer": inf, "ops": count_ops(train_step)}


def count_ops(fn) -> int:
    """aten operations of one call of fn, nested ones and views included (torch.profiler):
    what the dispatcher, and on a GPU the kernel launches, pay for."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    return sum(e.count for e in p.key_averages() if e.key.startswith("aten::"))


def spread(ms: list) -> tuple:
    q = statistics.quantiles(ms, n=10) if len(ms) > 1 else [ms[0]] * 9
    return statistics.median(ms), q[0], q[-1]


def ratios(name: str, med: dict, device) -> None:
    """Speed-ups of the fast fp32 path over the reference path and over lfads-torch."""
    fast = med.get(("fast", "fp32"))
    for (path, prec), ms in med.items():
        if path == "reference" and prec == "fp32" and fast:
            print(f"  fast path is {ms / fast:.2f}x the reference path (fp32)")
        if path == "fast" and prec == "bf16" and fast:
            print(f"  bf16 is {fast / ms:.2f}x fp32 on the fast path")
        if path == "fast" and name == "mc_maze" and device.type == "cpu":
            print(f"  fast path {prec} is {LFADS_TORCH_MS / ms:.2f}x lfads-torch "
                  f"({LFADS_TORCH_MS:.0f} ms/step, fp32, measured on a 2-core CPU, 2 threads)")


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(prog="python -m src.bench speed", description=__doc__)
    p.add_argument("--configs", nargs="+", default=["mc_maze", "quickstart"],
                   choices=list(CONFIGS), metavar="NAME", help=f"sizes to time, of: "
                   f"{' '.join(CONFIGS)} (default: mc_maze quickstart)")
    p.add_argument("--paths", nargs="+", default=["fast", "reference"],
                   choices=["fast", "reference"], metavar="PATH",
                   help="forward passes to time: fast (src/model.py), reference (the per-step "
                   "src/reference.py) (default: fast reference)")
    p.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()],
                   metavar="N", help="torch CPU thread counts to try (default: torch's, "
                   f"{torch.get_num_threads()})")
    p.add_argument("--steps", type=int, default=20, metavar="N",
                   help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, metavar="N",
                   help="untimed steps first (default: %(default)s)")
    p.add_argument("--device", default="cpu", metavar="{cpu,cuda,cuda:N,mps}",
                   help="where to time (default: %(default)s)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile each recurrent step as src.main's --compile does "
                   "(default: auto, on a GPU only)")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                   metavar="{fp32,bf16}", help="matrix-product precisions to time "
                   "(default: fp32)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if min(a.threads) < 1:
        p.error(f"--threads {' '.join(map(str, a.threads))}: each count must be at least 1")
    try:
        device = torch.device(a.device)
    except RuntimeError:
        p.error(f"--device {a.device}: expected cpu, cuda, cuda:N or mps")
    scan.COMPILE["setting"] = a.compile
    print(FLOP_FORMULA)
    rows = []
    for threads in a.threads:
        torch.set_num_threads(threads)
        peak = matmul_peak(device)
        print(f"\n{device.type}, {threads} threads, torch {torch.__version__}: float32 matmul "
              f"peak {peak:.0f} GFLOP/s")
        for name in a.configs:
            rows += time_config(name, threads, a, device, peak)
    print("\n| config | threads | path | precision | train ms/step (p10-p90) | trials/s "
          "| % of fp32 matmul peak | aten ops/step | inference ms/batch |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for name, threads, path, prec, m, lo, hi, tps, share, ops, mi in rows:
        print(f"| {name} | {threads} | {path} | {prec} | {m:.1f} ({lo:.1f}-{hi:.1f}) | {tps:.0f} "
              f"| {100 * share:.1f} | {ops} | {mi:.1f} |")
    if scan.COMPILE["seconds"]:
        print(f"torch.compile: {scan.COMPILE['seconds']:.1f} s to compile the recurrent steps "
              "(in the first steps, which are not timed)")
    return 0


def time_config(name: str, threads: int, a, device, peak: float) -> list:
    """Time every path and precision of one config; print each and their ratios."""
    c, batch = CONFIGS[name]
    gflop = 3 * forward_flops(c, batch) / 1e9
    print(f"{name}: batch {batch}, {gflop:.1f} GFLOP per training step ({gflop / 3:.2f} forward)")
    med, rows = {}, []
    for prec in a.precision:
        for path in a.paths:
            r = bench_one(c, batch, path, device, a.steps, a.warmup, prec)
            m, lo, hi = spread(r["train"])
            mi, _, _ = spread(r["infer"])
            med[path, prec] = m
            share = gflop / (m / 1000) / peak  # of the float32 peak, also for bf16
            rows.append((name, threads, path, prec, m, lo, hi, batch / m * 1000, share,
                         r["ops"], mi))
            print(f"  {path:9s} {prec} train {m:7.1f} ms/step (p10-p90 {lo:.1f}-{hi:.1f}),"
                  f" {batch / m * 1000:6.0f} trials/s, {gflop / (m / 1000):5.1f} GFLOP/s ="
                  f" {100 * share:4.1f}% of fp32 peak, {r['ops']} aten ops; inference {mi:.1f}"
                  " ms/batch")
    ratios(name, med, device)
    return rows
