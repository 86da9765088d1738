"""The hand-written recurrences of src/scan.py against autograd through the plain equations,
and their compiled steps against the eager ones."""

import pytest
import torch

from src import scan

B, T, U, F, H_CON, H_GEN = 3, 6, 2, 4, 5, 7


def gru(x, h, w_hh, b_hh, clip):
    """torch.nn.GRU's step from its input projection x, written out; then the clamp."""
    x_r, x_z, x_n = x.chunk(3, dim=1)
    h_r, h_z, h_n = (h @ w_hh.T + b_hh).chunk(3, dim=1)
    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return torch.clamp((1 - z) * n + z * h, -clip, clip)


def plain_decode(con_x, gen_x, c0, g0, w_con, b_con, w_cf, w_co, b_co, w_gu, w_gen, b_gen,
                 w_fac, keep_f, keep_g, noise, clip, var_min):
    """DecodeScan's equations, stepped with autograd recording every operation."""
    c, g = c0, g0
    f = (g0 * keep_g[0]) @ w_fac.T
    outs = []
    for t in range(con_x.shape[0]):
        c = gru(con_x[t] + (f * keep_f[t]) @ w_cf.T, c, w_con, b_con, clip)
        mean, logvar = (c @ w_co.T + b_co).chunk(2, dim=1)
        std = torch.sqrt(torch.exp(logvar) + var_min)
        u = mean + std * noise[t]
        g = gru(gen_x[t] + u @ w_gu.T, g, w_gen, b_gen, clip)
        f = (g * keep_g[t + 1]) @ w_fac.T
        outs.append((g, f, mean, std, u))
    return tuple(torch.stack(x) for x in zip(*outs))


def decode_inputs(seed=0, dtype=torch.float64):
    """Inputs of DecodeScan with dropout masks and noise; large enough weights that the clamp
    at 0.6 is active in some steps."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    keep = lambda *s: (torch.rand(*s, generator=g) > 0.3).to(dtype) / 0.7  # noqa: E731
    grads = [r(T, B, 3 * H_CON), r(T, B, 3 * H_GEN), r(B, H_CON), r(B, H_GEN),
             r(3 * H_CON, H_CON), r(3 * H_CON), r(3 * H_CON, F), r(2 * U, H_CON), r(2 * U),
             r(3 * H_GEN, U), r(3 * H_GEN, H_GEN), r(3 * H_GEN), r(F, H_GEN)]
    return ([x.requires_grad_() for x in grads], [keep(T, B, F), keep(T + 1, B, H_GEN),
                                                  r(T, B, U)])


@pytest.mark.parametrize("used", [(0, 1, 2, 3, 4), (1, 3, 4)])
def test_decode_scan_equals_autograd_through_the_equations(used):
    # used: the outputs the loss reads (the model's reads f, std and u; None gradients for g
    # and the means)
    leaves, consts = decode_inputs()
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=o.dtype)
               for i, o in enumerate(plain_decode(*leaves, *consts, 0.6, 1e-4))]
    results = []
    for fn in (scan.decode_scan, plain_decode):
        outs = fn(*leaves, *consts, 0.6, 1e-4)
        loss = sum((outs[i] * weights[i]).sum() for i in used)
        grads = torch.autograd.grad(loss, leaves)
        results.append((outs, grads))
    (ours, our_grads), (ref, ref_grads) = results
    assert (ref[0].abs() >= 0.6 - 1e-12).any()  # the clamp acts somewhere
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_gru_scan_with_a_clamp_equals_torch_gru_cells():
    # the autonomous generator: D = 1, clamped states; values against torch.nn.GRUCell,
    # gradients against autograd through the written-out step
    torch.manual_seed(1)
    cell = torch.nn.GRUCell(4, 6).double()
    x = torch.randn(T, B, 4, dtype=torch.float64)
    h0 = (3 * torch.randn(B, 6, dtype=torch.float64)).requires_grad_()
    x.requires_grad_()
    ours = scan.gru_scan(x[None], cell.weight_ih[None], cell.bias_ih[None], h0[None],
                         cell.weight_hh[None], cell.bias_hh.view(1, 1, -1), 0.5)[0]
    h, torch_states, plain = h0, [], []
    with torch.no_grad():
        for t in range(T):
            h = cell(x[t], h).clamp(-0.5, 0.5)
            torch_states.append(h)
    h = h0
    for t in range(T):
        h = gru(x[t] @ cell.weight_ih.T + cell.bias_ih, h, cell.weight_hh, cell.bias_hh, 0.5)
        plain.append(h)
    torch.testing.assert_close(ours, torch.stack(torch_states))
    assert (ours.abs() == 0.5).any()  # the clamp acts somewhere
    w = torch.randn(T, B, 6, dtype=torch.float64)
    leaves = [h0, cell.weight_hh, cell.bias_hh, cell.weight_ih, cell.bias_ih, x]
    g_ours = torch.autograd.grad((ours * w).sum(), leaves)
    g_ref = torch.autograd.grad((torch.stack(plain) * w).sum(), leaves)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)


def test_compiled_steps_equal_the_eager_ones(monkeypatch):
    # torch.compile fuses each step's arithmetic; the numbers stay those of the eager steps
    leaves, consts = decode_inputs(dtype=torch.float32)
    results = []
    monkeypatch.setitem(scan.COMPILE, "env", True)
    for setting in ("off", "on"):
        monkeypatch.setitem(scan.COMPILE, "setting", setting)
        outs = scan.decode_scan(*leaves, *consts, 0.6, 1e-4)
        grads = torch.autograd.grad(sum(o.sum() for o in outs), leaves)
        enc = scan.gru_scan(leaves[0].detach()[None].requires_grad_(),
                            torch.eye(3 * H_CON)[None].repeat(2, 1, 1), torch.zeros(2, 3 * H_CON),
                            torch.zeros(2, B, H_CON), leaves[4].detach()[None].repeat(2, 1, 1),
                            leaves[5].detach().view(1, 1, -1).repeat(2, 1, 1))
        results.append((outs, grads, enc))
    assert scan.COMPILE["seconds"] > 0  # it compiled, and timed it
    for a, b in zip(*(r[0] + r[1] + (r[2],) for r in results)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_failed_compile_falls_back_to_eager_with_one_note(monkeypatch, capsys):
    def broken(fn, **kw):
        def call(*args):
            raise RuntimeError("no C++ compiler")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(scan, "_compiled", {})
    monkeypatch.setitem(scan.COMPILE, "setting", "on")
    monkeypatch.setitem(scan.COMPILE, "env", True)
    leaves, consts = decode_inputs(dtype=torch.float32)
    ours = scan.decode_scan(*leaves, *consts, 0.6, 1e-4)
    ref = plain_decode(*leaves, *consts, 0.6, 1e-4)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    err = capsys.readouterr().err
    assert err.count("note: torch.compile failed (RuntimeError: no C++ compiler)") == 1
    assert scan.COMPILE["env"] is False  # no second try in this process


def test_buffers_outlive_no_call_and_outputs_are_copies():
    # a forward whose backward never runs leaves nothing behind once its outputs go (the
    # buffers live on the autograd node); a later call reusing pooled buffers leaves earlier
    # outputs as they were
    import gc
    import weakref

    leaves, consts = decode_inputs(dtype=torch.float32)
    outs = scan.decode_scan(*leaves, *consts, 0.6, 1e-4)
    bufs = [weakref.ref(b) for b in outs[0].grad_fn.s[:8]]
    del outs
    gc.collect()
    assert all(r() is None for r in bufs)
    with torch.no_grad():
        first = scan.decode_scan(*leaves, *consts, 0.6, 1e-4)
        kept = [o.clone() for o in first]
        second = scan.decode_scan(*[x * 2 for x in leaves], *consts, 0.6, 1e-4)
    for a, b in zip(first, kept):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(first[1], second[1])


def test_pool_keeps_few_buffers_of_few_shapes(monkeypatch):
    monkeypatch.setattr(scan, "_pool", {})
    for n in range(40):
        scan.give_back(*(torch.empty(n + 1, 3) for _ in range(6)))
    assert len(scan._pool) == 32 and all(len(v) == 4 for v in scan._pool.values())
    assert (1, 3) not in {k[0] for k in scan._pool}  # the oldest shapes went first
    b = scan._pool[((40, 3), torch.float32, torch.device("cpu"))][-1]
    assert scan.take(torch.empty(0), 40, 3) is b  # a buffer of that shape, given back
    scan._pool.clear()  # at most 1 GB in all (torch.empty touches no memory)
    scan.give_back(torch.empty(2**26), torch.empty(2**26), torch.empty(2**27))  # 1 GB: kept
    assert [(k[0], len(v)) for k, v in scan._pool.items()] == [((2**26,), 2), ((2**27,), 1)]
    scan.give_back(torch.empty(2**26))  # 1.25 GB: the shape used longest ago goes
    assert [(k[0], len(v)) for k, v in scan._pool.items()] == [((2**26,), 3)]
