"""The model's recurrences as two autograd Functions, their backward pass written by hand.

Autograd records every small operation of every time step and replays each one backward:
stepped that way, one LFADS training step is some 35,000 operations, and the CPU spends its
time dispatching them (a GPU, launching kernels) instead of computing. Here each recurrence is
one node of the autograd graph. Its forward loop runs unrecorded and writes every step's
values into buffers, one per quantity with a slice per step (no step allocates, and nothing
is concatenated or stacked afterwards); its backward loop is the chain rule written out, into
buffers too; the weight gradients of all steps are one matrix product each, after the loop.
The buffers come from a pool that the next call reuses (see `take`). One step, forward or
backward, is one function (`gru_step`, `gru_back`, `decode_step`, `decode_back`), and `fused`
compiles each with torch.compile (on GPUs, or with --compile on), so that a step's elementwise
arithmetic runs as one kernel. src/model.py reads as the equations and calls

    gru_scan      D independent GRUs stepped together (the encoders' directions)
    decode_scan   controller -> inferred input -> generator -> factors, one bin at a time

tests/test_scan.py checks both against autograd through their equations written out and
against torch's GRU; tests/test_reference.py checks the whole model against src/reference.py.

The GRU is torch.nn.GRU's (reset gate after the recurrent product), with hh = W_hh h + b_hh:
    r, z = sigmoid(x_r + hh_r), sigmoid(x_z + hh_z)    n = tanh(x_n + r hh_n)
    h' = clamp(n + z (h - n), -clip, clip)
and, for an upstream gradient q on h' (zero where the clamp is active):
    dn = q (1 - z) tanh'    dz = q (h - n) sigmoid'    dr = dn hh_n sigmoid'
    dx = [dr, dz, dn]    dhh = [dr, dz, dn r]    dh = q z + dhh W_hh
"""

import os
import sys
import time

import torch

from src.utils import autocast_off

aten = torch.ops.aten
NO_CLIP = 1e30  # the encoders' GRUs: a clamp that never acts
# is torch.compile tracing this call? (torch 2.1-2.2 cannot say: they compile the eager form,
# fail, and run eagerly with a note)
is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def gate(x, hh, h, clip: float, h_new, rz, n):
    """A GRU's new state from its input and recurrent projections x, hh (..., 3H) and state h
    (..., H), written into h_new; sigmoid([r, z]) and n, which the backward needs, into rz and
    n (buffers of the scan: no step allocates)."""
    H = h.shape[-1]
    torch.add(x[..., : 2 * H], hh[..., : 2 * H], out=rz).sigmoid_()  # (..., 2H)
    torch.addcmul(x[..., 2 * H :], rz[..., :H], hh[..., 2 * H :], out=n).tanh_()  # (..., H)
    torch.lerp(n, h, rz[..., H:], out=h_new)
    if clip < NO_CLIP:
        h_new.clamp_(-clip, clip)


def gate_back(q, h_new, h, rz, n, hh, clip: float, dx, dhh):
    """The gradient of `gate`: q on h' -> dx (..., 3H) on x and dhh on hh, written into those
    buffers, and the direct part q z of h's, returned. The clamp passes gradient where
    |h'| < clip (hardtanh's rule)."""
    H = h.shape[-1]
    if clip < NO_CLIP:
        q = aten.hardtanh_backward(q, h_new, -clip, clip)
    qz = q * rz[..., H:]  # q z: the gradient h' passes straight to h
    if is_compiling():  # one fused kernel; it writes only whole tensors
        dn = aten.tanh_backward(q - qz, n)  # (..., H)
        d_rz = aten.sigmoid_backward(torch.cat([dn * hh[..., 2 * H :], q * (h - n)], -1), rz)
        dx.copy_(torch.cat([d_rz, dn], -1))
        dhh.copy_(torch.cat([d_rz, dn * rz[..., :H]], -1))
        return qz
    # eagerly, each part is written in place: a concatenation would be a pass more
    dn = aten.tanh_backward.grad_input(q - qz, n, grad_input=dx[..., 2 * H :])  # (..., H)
    torch.mul(dn, hh[..., 2 * H :], out=dhh[..., :H])  # dhh's first 2H: scratch until the copy
    torch.mul(q, h - n, out=dhh[..., H : 2 * H])
    aten.sigmoid_backward.grad_input(dhh[..., : 2 * H], rz, grad_input=dx[..., : 2 * H])
    dhh[..., : 2 * H].copy_(dx[..., : 2 * H])
    torch.mul(dn, rz[..., :H], out=dhh[..., 2 * H :])
    return qz


# -----------------------------------------------------------------------------
# D independent GRUs


def gru_step(x, h, w_t, b_hh, clip: float, h_new, rz, n, hh):
    """One step of D GRUs: x (D, B, 3H) its input projections, h (D, B, H); w_t (D, H, 3H),
    b_hh (D, 1, 3H). Writes the new state into h_new, and rz, n and hh (D, B, .) for the
    backward (each step's slices of the scan's buffers)."""
    torch.baddbmm(b_hh, h, w_t, out=hh)  # (D, B, 3H)
    gate(x, hh, h, clip, h_new, rz, n)


def gru_back(dh, d_state, h_new, h, rz, n, hh, w_hh, clip: float, dx, dhh):
    """The gradient of one step: dh on h_new from later steps and d_state from the states
    returned -> dh on h; dx and dhh (D, B, 3H) written into the step's slices of buffers."""
    qz = gate_back(dh + d_state, h_new, h, rz, n, hh, clip, dx, dhh)
    return torch.baddbmm(qz, dhh, w_hh)  # (D, B, H)


class GRUScan(torch.autograd.Function):
    """D GRUs over T steps, in G groups that read one input each (the encoders: the forward
    directions read x, the backward ones x flipped in time). x: (G, T, B, N); w_ih (D, 3H, N),
    b_ih (D, 3H); h0: (D, B, H); w_hh: (D, 3H, H), b_hh: (D, 1, 3H). GRU d reads x[d // (D /
    G)]. The input projections are the scan's too: their T-step outputs and gradients stay in
    its buffers. Returns the states (D, T, B, H)."""

    @staticmethod
    def forward(ctx, x, w_ih, b_ih, h0, w_hh, b_hh, clip, keep):
        x, w_ih, b_ih, h0, w_hh, b_hh = inputs(x, w_ih, b_ih, h0, w_hh, b_hh)
        (G, T, B, N), (D, H) = x.shape, w_hh.shape[::2]
        proj = take(h0, D, T, B, 3 * H)
        for d in range(D):  # every step's input projection, W_ih x + b_ih: (T B, 3H)
            torch.addmm(b_ih[d], x[d * G // D].reshape(T * B, N), w_ih[d].t(),
                        out=proj[d].view(T * B, 3 * H))
        s = [take(h0, T + 1, D, B, H)] + [take(h0, T, D, B, k * H) for k in (2, 1, 3)]
        s[0][0] = h0
        w_t, step = w_hh.transpose(1, 2), fused(gru_step, x.device)  # w_t: (D, H, 3H)
        view, (hs, rz, n, hh) = steps(proj, 1), [steps(v) for v in s]
        with float32(x):
            for t in range(T):
                step(view[t], hs[t], w_t, b_hh, clip, hs[t + 1], rz[t], n[t], hh[t])
        give_back(proj)
        states = s[0][1:].transpose(0, 1).clone()  # (D, T, B, H): a copy, the buffers stay ours
        if keep:  # else nothing will ask for gradients (validation, inference)
            ctx.s, ctx.clip = s, clip  # buffers, not outputs: no reference cycle
            ctx.save_for_backward(x, w_ih, w_hh)
        else:
            give_back(*s)
        return states

    @staticmethod
    def backward(ctx, d_states):
        x, w_ih, w_hh = ctx.saved_tensors
        s, back = ctx.s, fused(gru_back, w_hh.device)
        hs, (G, T, B, N) = s[0], x.shape
        D, H = hs.shape[1], hs.shape[-1]
        ds = [take(hs, D, T, B, 3 * H), take(hs, D, T, B, 3 * H)]  # dx, dhh
        dh, (h, rz, n, hh), (dx, dhh) = torch.zeros_like(hs[0]), [steps(v) for v in s], [
            steps(v, 1) for v in ds]
        d_states = d_states.unbind(1)
        for t in range(T - 1, -1, -1):
            dh = back(dh, d_states[t], h[t + 1], h[t], rz[t], n[t], hh[t], w_hh, ctx.clip, dx[t],
                      dhh[t])
        # the weights' gradients, each one product over all steps: (D, T B, .) operands
        dx, dhh = (v.view(D, T * B, 3 * H) for v in ds)
        h_prev = take(hs, D, T, B, H).copy_(hs[:-1].transpose(0, 1)).view(D, T * B, H)
        d_w = torch.bmm(dhh.transpose(1, 2), h_prev)  # (D, 3H, H)
        # (D, 3H, N); x^T dx, then transposed: the faster order for BLAS with T B rows
        d_w_ih = torch.stack([(x[d * G // D].reshape(T * B, N).t() @ dx[d]).t()
                              for d in range(D)])
        d_x = None
        if ctx.needs_input_grad[0]:  # (G, T, B, N): each group's GRUs' gradients, summed
            d_x = torch.bmm(dx, w_ih).view(G, D // G, T, B, N).sum(1)
        grads = d_x, d_w_ih, dx.sum(1), dh, d_w, dhh.sum(1, keepdim=True), None, None
        give_back(*s, *ds, h_prev.view(D, T, B, H))
        return grads


def gru_scan(x, w_ih, b_ih, h0, w_hh, b_hh, clip: float = NO_CLIP):
    args = x, w_ih, b_ih, h0, w_hh, b_hh
    return GRUScan.apply(*args, clip, needs_grad(*args))


# -----------------------------------------------------------------------------
# the controller and the generator


def decode_step(x, v, w, clip: float, var_min: float):
    """One step of DecodeScan. x: the step's inputs (con_x, gen_x, keep_f, keep_g, noise); v:
    the step's slices of the scan's buffers (see `step_views`); w: the weights, the matrices
    transposed. Writes the new c, g, f and what the backward needs into v."""
    w_con, b_con, w_cf, w_co, b_co, w_gu, w_gen, b_gen, w_fac = w
    cx, gx, kf, kg, eps = x
    c, c_new, g, g_new, g_kept, f, f_new, f_in, co, std, u, gates_c, gates_g = v
    U = u.shape[-1]
    torch.mul(f, kf, out=f_in)  # the controller's dropout on the factors it reads
    torch.addmm(b_con, c, w_con, out=gates_c[2])  # hh_c, (B, 3H_con)
    gate(torch.addmm(cx, f_in, w_cf), gates_c[2], c, clip, c_new, *gates_c[:2])
    torch.addmm(b_co, c_new, w_co, out=co)  # [mean, logvar], (B, 2U)
    torch.exp(co[:, U:], out=std).add_(var_min).sqrt_()
    torch.addcmul(co[:, :U], std, eps, out=u)  # u = mean + std noise
    torch.addmm(b_gen, g, w_gen, out=gates_g[2])  # hh_g, (B, 3H_gen)
    gate(torch.addmm(gx, u, w_gu), gates_g[2], g, clip, g_new, *gates_g[:2])
    torch.mul(g_new, kg, out=g_kept)
    torch.mm(g_kept, w_fac, out=f_new)


def decode_back(dc, dg, d_out, v, dv, w, x, clip: float):
    """The gradient of one step: from those of c_t (dc), g_t (dg) and of the scan's outputs at
    t, d_out = (g, f, mean, std, u; each (B, .), None where unused), to c_{t-1} and g_{t-1};
    the gradients of the step's products written into dv = (f_t, f_{t-1}, [mean, logvar], x_c,
    hh_c, x_g, hh_g), the step's slices of buffers. v: (c_{t-1}, c_t, g_{t-1}, g_t, gates_c,
    gates_g); w: the weights untransposed; x: (keep_f, keep_g, noise, d std / d logvar)."""
    w_con, w_cf, w_co, w_gu, w_gen, w_fac = w
    c_prev, c, g_prev, g, gates_c, gates_g = v
    df, df_prev, d_co, dx_c, dhh_c, dx_g, dhh_g = dv
    d_g, d_f, d_mean, d_std, d_u = d_out
    kf, kg, eps, dstd = x
    if d_f is not None:
        df.add_(d_f)  # f_t's whole gradient: the next controller's and the loss's
    dg = torch.addcmul(plus(dg, d_g), torch.mm(df, w_fac), kg)
    qz_g = gate_back(dg, g, g_prev, *gates_g, clip, dx_g, dhh_g)
    du = plus(torch.mm(dx_g, w_gu), d_u)  # (B, U)
    torch.cat([plus(du, d_mean), plus(du * eps, d_std) * dstd], 1, out=d_co)  # on to the mean,
    dc = torch.addmm(dc, d_co, w_co)                                           # the logvar
    qz_c = gate_back(dc, c, c_prev, *gates_c, clip, dx_c, dhh_c)
    torch.mm(dx_c, w_cf, out=df_prev).mul_(kf)  # on to f_{t-1}, through the dropout
    return torch.addmm(qz_c, dhh_c, w_con), torch.addmm(qz_g, dhh_g, w_gen)


class DecodeScan(torch.autograd.Function):
    """The controller and the generator, coupled through the inferred input and the factors.
    Per step t, with the state c of the controller and g of the generator:

        c_t = GRU_con(con_x_t + W_cf (f_{t-1} keep_f_t), c_{t-1})       controller
        [mean_t, logvar_t] = W_co c_t + b_co                              posterior of u_t
        std_t = sqrt(exp(logvar_t) + var_min);  u_t = mean_t + std_t noise_t
        g_t = GRU_gen(gen_x_t + W_gu u_t, g_{t-1})                        generator
        f_t = W_fac (g_t keep_g_{t+1})                                    factors

    with f_{-1} = W_fac (g_0 keep_g_0). Inputs: con_x (T, B, 3H_con) and gen_x (T, B, 3H_gen),
    the projections of every step's other inputs; c0, g0; the weights; keep_f (T, B, F), keep_g
    (T + 1, B, H_gen) and noise (T, B, U), which carry no gradient. Returns g, f and u's
    posterior mean, std and sample, each (T, B, .)."""

    @staticmethod
    def forward(ctx, con_x, gen_x, c0, g0, w_con, b_con, w_cf, w_co, b_co, w_gu, w_gen, b_gen,
                w_fac, keep_f, keep_g, noise, clip, var_min, keep):
        ctx.set_materialize_grads(False)
        x = inputs(con_x, gen_x, keep_f, keep_g, noise)
        c0, g0, *w = inputs(c0, g0, w_con, b_con, w_cf, w_co, b_co, w_gu, w_gen, b_gen, w_fac)
        ctx.save_for_backward(*(v for v in w if v.dim() == 2))  # w_con, w_cf, ..., w_fac
        w = [v.t() if v.dim() == 2 else v for v in w]
        (T, B, U), Hc, Hg, F = noise.shape, c0.shape[1], g0.shape[1], w_fac.shape[0]
        new = lambda n, k: take(g0, n, B, k)  # noqa: E731
        # every step's values, index t + 1 for step t's: c, g, g keep_g, f (f_{-1} at 0),
        # then f keep_f, [mean, logvar], std, u, the controller's and the generator's gates
        s = [new(T + 1, Hc), new(T + 1, Hg), new(T + 1, Hg), new(T + 1, F), new(T, F),
             new(T, 2 * U), new(T, U), new(T, U), [new(T, k * Hc) for k in (2, 1, 3)],
             [new(T, k * Hg) for k in (2, 1, 3)]]
        s[0][0], s[1][0] = c0, g0
        torch.mm(torch.mul(g0, x[3][0], out=s[2][0]), w[-1], out=s[3][0])  # f_{-1}
        step = fused(decode_step, g0.device)
        xs, v = [u.unbind(0) for u in x], [steps(u) for u in s[:8]] + [
            [steps(u) for u in gates] for gates in s[8:]]
        with float32(con_x):
            for t in range(T):
                xt = (xs[0][t], xs[1][t], xs[2][t], xs[3][t + 1], xs[4][t])
                step(xt, step_views(v, t), w, clip, var_min)
        # copies, so the buffers stay the scan's
        outs = tuple(v.clone() for v in (s[1][1:], s[3][1:], s[5][..., :U], s[6], s[7]))
        if keep:  # else nothing will ask for gradients: keep nothing
            # d std / d logvar = exp(logvar) / 2 std = (std^2 - var_min) / 2 std
            ctx.x = (*x[2:], (s[6] * s[6] - var_min) / (2 * s[6]))
            ctx.s, ctx.clip = s, clip  # buffers, not outputs: no reference cycle
        else:
            give_back(*s[:8], *s[8], *s[9])
        return outs

    @staticmethod
    def backward(ctx, *d_out):
        w = ctx.saved_tensors
        s, clip = ctx.s, ctx.clip
        c, g, g_kept, f, f_in, co, std, u, gates_c, gates_g = s
        T, back = std.shape[0], fused(decode_back, std.device)
        # gradients of f (index t + 1 for f_t), [mean, logvar], and x, hh of both GRUs
        hh_c, hh_g = gates_c[2], gates_g[2]
        ds = [take(f, *f.shape), take(co, *co.shape), torch.empty_like(hh_c),
              take(hh_c, *hh_c.shape), torch.empty_like(hh_g), take(hh_g, *hh_g.shape)]
        ds[0][T].zero_()
        # every step's slices: of the gradients' buffers (dx_c, dx_g are returned: not cut
        # once and kept) and of the forward's
        d_steps = [v.unbind(0) if i in (2, 4) else steps(v) for i, v in enumerate(ds)]
        c_t, g_t = steps(c), steps(g)
        gates_t = [list(zip(*(steps(v) for v in gates))) for gates in (gates_c, gates_g)]
        keep_f, keep_g, noise, dstd = (v.unbind(0) for v in ctx.x)
        d_out = [None if d is None else d.unbind(0) for d in d_out]
        dc, dg = torch.zeros_like(c[0]), torch.zeros_like(g[0])
        for t in range(T - 1, -1, -1):
            h = c_t[t], c_t[t + 1], g_t[t], g_t[t + 1], gates_t[0][t], gates_t[1][t]
            dv = d_steps[0][t + 1], *(d[t] for d in d_steps)
            dc, dg = back(dc, dg, [None if d is None else d[t] for d in d_out], h, dv, w,
                          (keep_f[t], keep_g[t + 1], noise[t], dstd[t]), clip)
        df, d_co, dx_c, dhh_c, dx_g, dhh_g = ds
        dg = torch.addcmul(dg, torch.mm(df[0], w[-1]), ctx.x[1][0])  # f_{-1} reaches g_0 too
        grads = (dx_c, dx_g, dc, dg,
                 grad_w(dhh_c, c[:-1]), rows(dhh_c).sum(0), grad_w(dx_c, f_in),
                 grad_w(d_co, c[1:]), rows(d_co).sum(0), grad_w(dx_g, u),
                 grad_w(dhh_g, g[:-1]), rows(dhh_g).sum(0), grad_w(df, g_kept), *[None] * 6)
        give_back(*s[:8], *gates_c, *gates_g, df, d_co, dhh_c, dhh_g)
        return grads


def decode_scan(*args):
    return DecodeScan.apply(*args, needs_grad(*args))


# -----------------------------------------------------------------------------
# helpers


def inputs(*xs):
    """The tensors a scan steps through: unrecorded, float32 (views stay views: a step reads
    its slice of x wherever it lies)."""
    return [x.detach().to(torch.promote_types(x.dtype, torch.float32)) for x in xs]


def float32(x):
    """Autocast off inside the scans: their states and gate arithmetic stay float32 under
    bfloat16 autocast, whose rounding would compound over the steps."""
    return autocast_off(x.device)


# Every-step buffers that scans have given back, by (shape, dtype, device). A scan's buffers
# are tens of MB; freed and allocated afresh at every training step, each costs the OS's page
# faults again (docs/performance.md). A buffer returns here only when nothing outside the scan
# can see it: the scans return copies, and a backward gives back what it has read.
_pool: dict = {}


def take(like, *shape):
    """An uninitialised buffer of `shape`, dtype and device of `like`: one given back, or new."""
    free = _pool.get((shape, like.dtype, like.device))
    return free.pop() if free else like.new_empty(shape)


def give_back(*buffers):
    for b in buffers:
        key = (tuple(b.shape), b.dtype, b.device)
        _pool[key] = free = _pool.pop(key, [])  # moved last: the dict runs oldest use first
        if len(free) < 4:  # a few per shape: training, the last batch, validation
            free.append(b)
    # the shapes of long ago (another model, other data, inference in other batch sizes) go
    while len(_pool) > 32 or len(_pool) > 1 and sum(
            b.numel() * b.element_size() for free in _pool.values() for b in free) > 2**30:
        _pool.pop(next(iter(_pool)))


def steps(b, dim: int = 0) -> tuple:
    """b's slices along dim, one per step, made once and kept on b: a buffer of the pool is
    sliced at its first use, not at every call (each slice is an operation torch dispatches).
    They share b's memory without being views of b, which would keep b alive through its own
    attribute (a reference cycle that Python's collector cannot see)."""
    cache = b.__dict__.setdefault("steps", {})
    if dim not in cache:
        store, new = b.untyped_storage(), lambda: torch.empty(0, dtype=b.dtype, device=b.device)
        cache[dim] = tuple(new().set_(store, v.storage_offset(), v.shape, v.stride())
                           for v in b.unbind(dim))
    return cache[dim]


def needs_grad(*xs) -> bool:
    """Will a backward pass follow? Only then do the scans keep every step's gates."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad
                                           for x in xs)


def step_views(s, t: int) -> tuple:
    """Step t's slices of DecodeScan's buffers (s: each buffer's `steps`): c_{t-1}, c_t,
    g_{t-1}, g_t, g_t keep_g, f_{t-1}, f_t, then f keep_f, [mean, logvar], std, u, and the
    gates of both GRUs at t."""
    c, g, g_kept, f, f_in, co, std, u, gates_c, gates_g = s
    return (c[t], c[t + 1], g[t], g[t + 1], g_kept[t + 1], f[t], f[t + 1], f_in[t], co[t],
            std[t], u[t], [v[t] for v in gates_c], [v[t] for v in gates_g])


def plus(a, b):
    return a if b is None else a + b


def rows(x):
    """(T, ..., K) -> (T * ..., K): the rows of every step, for one weight-gradient product."""
    return x.flatten(0, -2)


def grad_w(dy, x):
    """The gradient of a weight used at every step, y_t = W x_t, from dy and x (T, ..., .): the
    sum over the steps of dy_t^T x_t, as one product (x^T dy, transposed: BLAS is faster in
    that order when x has few columns)."""
    return torch.mm(rows(x).t(), rows(dy)).t()


# -----------------------------------------------------------------------------
# compiling the steps


# "env": False when LFADS_COMPILE=0 (the test suite's setting) or after compiling failed: never
# compile in this process; "setting": --compile of src.main (on, off, auto: on a CUDA GPU);
# "seconds": what the first calls of the compiled steps took, compiling included
COMPILE = {"env": os.environ.get("LFADS_COMPILE", "1") != "0", "setting": "auto", "seconds": 0.0}
_compiled = {}


def compiling(device: torch.device) -> bool:
    """Compile the steps on this device? --compile auto compiles on a GPU, where each small
    operation is a kernel launch; on a CPU compiling gains under 10% a step
    (docs/performance.md) and costs seconds at the start."""
    setting = COMPILE["setting"]
    wanted = setting == "on" or (setting == "auto" and device.type == "cuda")
    return COMPILE["env"] and wanted and device.type in ("cpu", "cuda")


def fused(fn, device: torch.device):
    """`fn` compiled by torch.compile where `compiling` says so (its elementwise arithmetic
    fused into one kernel, its products left to the BLAS), else `fn` itself; `fn` itself from
    the first failure to compile on."""
    if not compiling(device):
        return fn
    if fn not in _compiled:
        _compiled[fn] = first_call(fn, torch.compile(fn, dynamic=True, fullgraph=True))
    return _compiled[fn]


def first_call(fn, compiled):
    """Call `compiled`; its first call compiles, and is timed. If compiling fails, say so in
    one line and run every step eagerly from then on."""
    state = {"done": False}

    def call(*args):
        if not COMPILE["env"]:  # an earlier step failed to compile
            return fn(*args)
        t0 = time.time()
        try:
            out = compiled(*args)
        except Exception as e:  # no C++ compiler, an unsupported platform: eager still works
            COMPILE["env"] = False
            print(f"note: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); the "
                  "recurrent steps run eagerly (slower, same results)", file=sys.stderr)
            return fn(*args)
        if not state["done"]:
            COMPILE["seconds"] += time.time() - t0
            state["done"] = True
        return out

    return call
