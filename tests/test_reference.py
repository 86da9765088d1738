"""The fast model (src/model.py) against the plain per-step one (src/reference.py)."""

import pytest
import torch

from src import bench
from src.bench.speed import CONFIGS, forward_flops
from src.model import LFADS, LFADSConfig
from src.reference import gru_step, reference_forward
from src.utils import autocast


def pair(co_dim, ext_dim, sample, seed=0):
    """Outputs, losses and gradients of both paths on the same weights and noise."""
    cfg = LFADSConfig(n_in=7, n_out=9, t_enc=10, t_rec=13, ext_dim=ext_dim, ic_enc_dim=8,
                      ci_enc_dim=6, con_dim=5, co_dim=co_dim, ic_dim=4, gen_dim=12, fac_dim=5,
                      dropout=0.2, ci_lag=2)
    torch.manual_seed(seed)
    model = LFADS(cfg).eval()  # eval: dropout masks are the one thing the paths draw differently
    recon = torch.poisson(torch.rand(3, 13, 9) * 2)
    ext = torch.randn(3, 13, ext_dim) if ext_dim else None
    results = []
    for forward in (model, lambda *a, **k: reference_forward(model, *a, **k)):
        torch.manual_seed(seed + 1)  # the same posterior samples in both
        model.zero_grad()
        out = forward(recon[:, :10, :7], recon, ext, sample=sample)
        model.total_loss(out.losses, 0.7, 0.3).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    return results


@pytest.mark.parametrize("co_dim,ext_dim,sample", [(4, 0, True), (4, 0, False), (0, 0, True),
                                                   (2, 3, True)])
def test_fast_path_equals_the_reference(co_dim, ext_dim, sample):
    (fast, g_fast), (ref, g_ref) = pair(co_dim, ext_dim, sample)
    for name in ("log_rates", "factors", "gen_states", "ic_mean", "ic_std", "co_mean", "u"):
        a, b = getattr(fast, name), getattr(ref, name)
        if co_dim == 0 and name in ("co_mean", "u"):
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    for k in fast.losses:
        torch.testing.assert_close(fast.losses[k], ref.losses[k], rtol=1e-5, atol=1e-4, msg=k)
    # every parameter that gets a gradient in one path gets the same one in the other (an
    # empty generator input matrix of the autonomous model has none in the fast path)
    assert {k for k, v in g_ref.items() if v.numel()} == set(g_fast)
    for k, v in g_fast.items():
        torch.testing.assert_close(v, g_ref[k], rtol=1e-4, atol=1e-4, msg=k)


def test_reference_gru_step_is_torch_gru_cell():
    torch.manual_seed(0)
    cell = torch.nn.GRUCell(5, 7)
    x, h = torch.randn(4, 5), torch.randn(4, 7)
    got = gru_step(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    torch.testing.assert_close(got, cell(x, h))


def test_flop_count_matches_the_documented_mc_maze_total():
    # docs/performance.md's 23.4 GFLOP per MC_Maze training step, a third of it forward
    c, batch = CONFIGS["mc_maze"]
    assert forward_flops(c, batch) / 1e9 == pytest.approx(7.8, abs=0.05)


def test_speed_bench_runs_in_a_tiny_configuration(capsys):
    assert bench.main(["speed", "--configs", "tiny", "--steps", "2", "--warmup", "1",
                       "--threads", "1", "--precision", "fp32", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "x the reference path (fp32)" in out and "% of fp32 peak" in out
    assert "bf16 is" in out and "x fp32 on the fast path" in out
    for path in ("fast", "reference"):
        assert f"| tiny | 1 | {path} | fp32 |" in out and f"| tiny | 1 | {path} | bf16 |" in out


def test_bf16_autocast_rounds_the_products_only():
    """Under --precision bf16 the rates follow the float32 ones to bf16's rounding, and the
    loss terms, weights and gradients stay float32."""
    cfg = LFADSConfig(n_in=20, n_out=25, t_enc=30, t_rec=35, gen_dim=64, fac_dim=16)
    torch.manual_seed(0)
    model = LFADS(cfg).eval()
    recon = torch.poisson(torch.rand(8, 35, 25) * 2)
    outs = []
    for precision in ("fp32", "bf16"):
        model.zero_grad()
        with autocast("cpu", precision):
            out = model(recon[:, :30, :20], recon, sample=False)
        model.total_loss(out.losses, 1.0, 1.0).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        assert all(v.dtype == torch.float32 for v in out.losses.values())
        outs.append(out)
    f32, b16 = outs
    assert b16.log_rates.dtype == torch.float32
    err = (b16.log_rates - f32.log_rates).abs().max().item()
    assert 0 < err < 0.05  # rounded (not float32 in disguise), and only by bf16's 3 digits
    assert b16.losses["recon"].item() == pytest.approx(f32.losses["recon"].item(), rel=1e-2)


def test_bench_without_a_name_prints_usage(capsys):
    assert bench.main([]) == 2
    assert "quality" in capsys.readouterr().err
