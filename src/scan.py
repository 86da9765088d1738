"""The model's recurrences as two autograd Functions, their backward pass written by hand.

Autograd records every small operation of every time step and replays each one backward:
stepped that way, one LFADS training step is some 35,000 operations, and the CPU spends its
time dispatching them (a GPU, launching kernels) instead of computing. Here each recurrence is
one node of the autograd graph. Its forward loop runs unrecorded and keeps what the backward
needs; its backward loop is the chain rule written out; the weight gradients of all steps are
one matrix product each, after the loop. One step, forward or backward, is one function
(`gru_step`, `gru_back`, `decode_step`, `decode_back`), and `fused` compiles each with
torch.compile (on GPUs, or with --compile on), so that a step's elementwise arithmetic runs as
one kernel. src/model.py reads as the equations and calls

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


def gate(x, hh, h, clip: float):
    """A GRU's new state from its input and recurrent projections x, hh (..., 3H) and state h
    (..., H); also sigmoid([r, z]) and n, for the backward."""
    H = h.shape[-1]
    rz = torch.sigmoid(x[..., : 2 * H] + hh[..., : 2 * H])  # (..., 2H)
    n = torch.tanh(torch.addcmul(x[..., 2 * H :], rz[..., :H], hh[..., 2 * H :]))  # (..., H)
    return torch.lerp(n, h, rz[..., H:]).clamp(-clip, clip), rz, n


def gate_back(q, h_new, h, rz, n, hh, clip: float):
    """The gradient of `gate`: q on h' -> (dx, dhh, dh's direct part). The clamp passes
    gradient where |h'| < clip (hardtanh's rule)."""
    H = h.shape[-1]
    q = aten.hardtanh_backward(q, h_new, -clip, clip)
    qz = q * rz[..., H:]  # q z: the gradient h' passes straight to h
    dn = aten.tanh_backward(q - qz, n)  # (..., H)
    d_rz = aten.sigmoid_backward(torch.cat([dn * hh[..., 2 * H :], q * (h - n)], -1), rz)
    return torch.cat([d_rz, dn], -1), torch.cat([d_rz, dn * rz[..., :H]], -1), qz


# -----------------------------------------------------------------------------
# D independent GRUs


def gru_step(x, t, h, w_t, b_hh, clip: float):
    """Step t of D GRUs: x (T, D, B, 3H), h (D, B, H), w_t (D, H, 3H), b_hh (D, 1, 3H)."""
    hh = torch.bmm(h, w_t) + b_hh  # (D, B, 3H)
    h, rz, n = gate(x[t], hh, h, clip)
    return h, rz, n, hh


def gru_back(dh, d_states, t, h_new, h, rz, n, hh, w_hh, clip: float):
    """The gradient of step t: dh on h_t from later steps, d_states (T, D, B, H) on the states
    returned -> (dx, dhh, dh on h_{t-1})."""
    dx, dhh, dh = gate_back(dh + d_states[t], h_new, h, rz, n, hh, clip)
    return dx, dhh, dh + torch.bmm(dhh, w_hh)  # (D, B, 3H), (D, B, 3H), (D, B, H)


class GRUScan(torch.autograd.Function):
    """D GRUs over T steps. x: (T, D, B, 3H) input projections (bias included), h0: (D, B, H),
    w_hh: (D, 3H, H), b_hh: (D, 1, 3H). Returns the states (T, D, B, H)."""

    @staticmethod
    def forward(ctx, x, h0, w_hh, b_hh, clip, keep):
        x, h0, w_hh, b_hh = inputs(x, h0, w_hh, b_hh)
        hs, saved, w_t, step = [h0], [], w_hh.transpose(1, 2), fused(gru_step)  # w_t: (D, H, 3H)
        with float32(x):
            for t in range(x.shape[0]):
                h, *rest = step(x, t, hs[-1], w_t, b_hh, clip)
                hs.append(h), saved.append(rest if keep else None)
        if keep:  # else nothing will ask for gradients (validation, inference): keep nothing
            ctx.hs, ctx.saved, ctx.clip = hs, saved, clip  # never an output: no ref cycle
            ctx.save_for_backward(w_hh)
        return torch.stack(hs[1:])  # (T, D, B, H)

    @staticmethod
    def backward(ctx, d_states):
        (w_hh,) = ctx.saved_tensors
        hs, dh, dxs, dhhs, back = ctx.hs, torch.zeros_like(ctx.hs[0]), [], [], fused(gru_back)
        d_states = d_states.contiguous()
        for t in range(len(ctx.saved) - 1, -1, -1):
            dx, dhh, dh = back(dh, d_states, t, hs[t + 1], hs[t], *ctx.saved[t], w_hh, ctx.clip)
            dxs.append(dx), dhhs.append(dhh)
        dhh = torch.stack(dhhs[::-1], 1).flatten(1, 2)  # (D, T B, 3H)
        h_prev = torch.stack(hs[:-1], 1).flatten(1, 2)  # (D, T B, H)
        d_w = torch.bmm(dhh.transpose(1, 2), h_prev)  # (D, 3H, H): the sum over steps
        return torch.stack(dxs[::-1]), dh, d_w, dhh.sum(1, keepdim=True), None, None


def gru_scan(x, h0, w_hh, b_hh, clip: float = NO_CLIP):
    return GRUScan.apply(x, h0, w_hh, b_hh, clip, needs_grad(x, h0, w_hh, b_hh))


# -----------------------------------------------------------------------------
# the controller and the generator


def decode_step(x, t, f, c, g, w, clip: float, var_min: float):
    """Step t of DecodeScan; x: its per-step inputs (con_x, gen_x, keep_f, keep_g, noise), w:
    its weights, the matrices transposed. Returns the new c, g and f, then what the backward
    needs."""
    w_con, b_con, w_cf, w_co, b_co, w_gu, w_gen, b_gen, w_fac = w
    cx, gx, kf, kg, eps = x[0][t], x[1][t], x[2][t], x[3][t + 1], x[4][t]
    f_in = f * kf  # the controller's dropout on the factors it reads
    hh_c = torch.mm(c, w_con) + b_con  # (B, 3H_con)
    c, rz_c, n_c = gate(cx + torch.mm(f_in, w_cf), hh_c, c, clip)
    mean, logvar = (torch.mm(c, w_co) + b_co).chunk(2, dim=1)  # (B, U) each
    std = torch.sqrt(torch.exp(logvar) + var_min)
    u = mean + std * eps
    hh_g = torch.mm(g, w_gen) + b_gen  # (B, 3H_gen)
    g, rz_g, n_g = gate(gx + torch.mm(u, w_gu), hh_g, g, clip)
    g_kept = g * kg
    return c, g, torch.mm(g_kept, w_fac), (mean, std, u, f_in, g_kept), (rz_c, n_c, hh_c,
                                                                          rz_g, n_g, hh_g)


def decode_back(df, dg, dc, d_out, t, h, saved, w, x, clip: float, var_min: float):
    """The gradient of step t: from those of f_t (df), g_t (dg), c_t (dc) and of the scan's
    outputs d_out = (g, f, mean, std, u; each (T, B, .), None where unused), to f_{t-1},
    g_{t-1}, c_{t-1} and the step's products. h: (c_{t-1}, c_t, g_{t-1}, g_t); w: the weights
    untransposed; x: (keep_f, keep_g, noise)."""
    w_con, w_cf, w_co, w_gu, w_gen, w_fac = w
    d_g, d_f, d_mean, d_std, d_u = (None if d is None else d[t] for d in d_out)
    kf, kg, eps = x[0][t], x[1][t + 1], x[2][t]
    c_prev, c, g_prev, g = h
    rz_c, n_c, hh_c, rz_g, n_g, hh_g, std = saved
    df = plus(df, d_f)  # f_t's whole gradient: the loss's and the next controller's
    dg = plus(dg, d_g) + torch.mm(df, w_fac) * kg
    dx_g, dhh_g, dg = gate_back(dg, g, g_prev, rz_g, n_g, hh_g, clip)
    du = plus(torch.mm(dx_g, w_gu), d_u)  # (B, U)
    dm = plus(du, d_mean)
    # std = sqrt(exp(v) + var_min): d std / d v = exp(v) / 2 std = (std^2 - var_min) / 2 std
    dv = plus(du * eps, d_std) * (std * std - var_min) / (2 * std)
    d_co = torch.cat([dm, dv], dim=1)  # (B, 2U)
    dc = dc + torch.mm(d_co, w_co)
    dx_c, dhh_c, dc = gate_back(dc, c, c_prev, rz_c, n_c, hh_c, clip)
    d_in = torch.mm(dx_c, w_cf) * kf  # on to f_{t-1}, through the dropout
    dc, dg = dc + torch.mm(dhh_c, w_con), dg + torch.mm(dhh_g, w_gen)  # on to t - 1
    return d_in, dg, dc, df, (dx_c, dx_g, dhh_c, dhh_g, d_co)


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
        c, g, *w = inputs(c0, g0, w_con, b_con, w_cf, w_co, b_co, w_gu, w_gen, b_gen, w_fac)
        ctx.clip, ctx.var_min, ctx.x = clip, var_min, x[2:]
        ctx.save_for_backward(*(v for v in w if v.dim() == 2))  # w_con, w_cf, ..., w_fac
        w = [v.t() if v.dim() == 2 else v for v in w]
        step, g_kept = fused(decode_step), [g * x[3][0]]  # g_t keep_g_t, t = 0..T
        f = torch.mm(g_kept[0], w[-1])  # f_{-1}, (B, F)
        cs, gs, outs, saved = [c], [g], [], []
        with float32(con_x):
            for t in range(x[0].shape[0]):
                c, g, f, out, gates = step(x, t, f, c, g, w, clip, var_min)
                cs.append(c), gs.append(g), outs.append((f, *out))
                saved.append(gates if keep else None)
        fs, means, stds, us, f_ins, g_kept[1:] = (list(v) for v in zip(*outs))
        if keep:  # else nothing will ask for gradients: keep nothing
            ctx.lists = cs, gs, g_kept, stds, us, f_ins, saved  # never an output: no ref cycle
        return tuple(torch.stack(v) for v in (gs[1:], fs, means, stds, us))

    @staticmethod
    def backward(ctx, *d_out):
        w = ctx.saved_tensors
        cs, gs, g_kept, stds, us, f_ins, saved = ctx.lists
        T, back = len(saved), fused(decode_back)
        d_out = [None if d is None else d.contiguous() for d in d_out]
        df, dc, dg = torch.zeros_like(f_ins[0]), torch.zeros_like(cs[0]), torch.zeros_like(gs[0])
        d_f, d_prods = [], []
        for t in range(T - 1, -1, -1):
            h = (cs[t], cs[t + 1], gs[t], gs[t + 1])
            df, dg, dc, df_t, prods = back(df, dg, dc, d_out, t, h, (*saved[t], stds[t]), w,
                                           ctx.x, ctx.clip, ctx.var_min)
            d_f.append(df_t), d_prods.append(prods)
        d_f.append(df)  # f_{-1} = W_fac (g_0 keep_g_0): its gradient reaches g_0 too
        dg = torch.addcmul(dg, torch.mm(df, w[-1]), ctx.x[1][0])
        d_con_x, d_gen_x, d_hh_c, d_hh_g, d_co = (torch.stack(v[::-1]) for v in zip(*d_prods))
        cs, gs = torch.stack(cs), torch.stack(gs)  # (T + 1, B, H)
        return (d_con_x, d_gen_x, dc, dg,
                grad_w(d_hh_c, cs[:-1]), rows(d_hh_c).sum(0), grad_w(d_con_x, torch.stack(f_ins)),
                grad_w(d_co, cs[1:]), rows(d_co).sum(0), grad_w(d_gen_x, torch.stack(us)),
                grad_w(d_hh_g, gs[:-1]), rows(d_hh_g).sum(0),
                grad_w(torch.stack(d_f[::-1]), torch.stack(g_kept)), *[None] * 6)


def decode_scan(*args):
    return DecodeScan.apply(*args, needs_grad(*args))


# -----------------------------------------------------------------------------
# helpers


def inputs(*xs):
    """The tensors a scan steps through: unrecorded, float32, in a standard layout (a compiled
    step is specialised to its inputs' layout and flags)."""
    return [x.detach().to(torch.promote_types(x.dtype, torch.float32)).contiguous() for x in xs]


def float32(x):
    """Autocast off inside the scans: their states and gate arithmetic stay float32 under
    bfloat16 autocast, whose rounding would compound over the steps."""
    return autocast_off(x.device)


def needs_grad(*xs) -> bool:
    """Will a backward pass follow? Only then do the scans keep every step's gates."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad
                                           for x in xs)


def steps(d, T: int) -> list:
    """An output's gradient as T steps; None steps where the loss does not use the output."""
    return [None] * T if d is None else d.unbind(0)


def plus(a, b):
    return a if b is None else a + b


def rows(x):
    """(T, ..., K) -> (T * ..., K): the rows of every step, for one weight-gradient product."""
    return x.flatten(0, -2)


def grad_w(dy, x):
    """The gradient of a weight used at every step, y_t = W x_t, from dy and x (T, ..., .): the
    sum over the steps of dy_t^T x_t, as one product."""
    return torch.mm(rows(dy).t(), rows(x))


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


def fused(fn):
    """`fn` compiled by torch.compile where `compiling` says so (its elementwise arithmetic
    fused into one kernel, its products left to the BLAS), else `fn` itself; `fn` itself from
    the first failure to compile on."""
    if fn not in _compiled:
        _compiled[fn] = first_call(fn, torch.compile(fn, dynamic=True, fullgraph=True))
    return _compiled[fn]


def first_call(fn, compiled):
    """Call `compiled`; its first call compiles, and is timed. If compiling fails, say so in
    one line and run every step eagerly from then on."""
    state = {"done": False}

    def call(*args):
        if not compiling(next(a.device for a in args if isinstance(a, torch.Tensor))):
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
