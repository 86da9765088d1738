"""The plain LFADS forward pass: every recurrent network stepped one bin at a time.

This is the model of src/model.py written the obvious way, for reading and for checking:
each GRU (both directions of both encoders, the controller, the generator) is a per-step cell
that projects its own input at every step, and the inputs are sliced and concatenated bin by
bin. It uses the parameters of an `LFADS` module, so the two can be compared on the same
weights; tests/test_reference.py checks that outputs, losses and gradients agree, and
`python -m src.bench speed` times both. Use src/model.py to train: it computes the same thing
several times faster (see the bench).

Dropout masks are drawn differently from src/model.py (per step here, all steps at once there),
so the two agree exactly in eval mode, with or without posterior sampling.
"""

import torch
import torch.nn.functional as F

from src.model import LFADS, Output


def gru_step(x, h, w_ih, w_hh, b_ih, b_hh, clip=float("inf")):
    """One GRU step, torch.nn.GRU's equations written out (reset gate after the product),
    the new state clamped to +-clip."""
    x_r, x_z, x_n = F.linear(x, w_ih, b_ih).chunk(3, dim=1)  # (B, H) each
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, dim=1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return torch.clamp(z * h + (1 - z) * n, -clip, clip)


def run_gru(gru: torch.nn.GRU, x, reverse: bool):
    """One direction of a bidirectional torch.nn.GRU, a step at a time; x: (B, T, in).
    Returns the states (B, T, H), each at the bin it has just read."""
    sfx = "_reverse" if reverse else ""
    w = [getattr(gru, f"{name}_l0{sfx}") for name in ("weight_ih", "weight_hh", "bias_ih",
                                                       "bias_hh")]
    h = x.new_zeros(x.shape[0], gru.hidden_size)  # (B, H)
    steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    states = [None] * x.shape[1]
    for t in steps:
        h = gru_step(x[:, t], h, *w)
        states[t] = h
    return torch.stack(states, dim=1)


def reference_forward(m: LFADS, encod, recon=None, ext=None, sample: bool = True) -> Output:
    """What LFADS.forward computes (with m's weights), stepped one bin at a time. One piece on
    purpose: the whole forward pass, read top to bottom without a jump."""
    cfg = m.cfg
    x = encod.float()
    cd_keep = None
    if m.training and cfg.cd_rate > 0:
        cd_keep = torch.rand_like(x) >= cfg.cd_rate
        x = x * cd_keep / (1 - cfg.cd_rate)
    x = m.dropout(x)

    # initial condition: last state of each direction of the IC encoder
    fwd, bwd = run_gru(m.ic_enc, x, False), run_gru(m.ic_enc, x, True)
    h = m.dropout(torch.cat([fwd[:, -1], bwd[:, 0]], dim=1))  # (B, 2 H_ic)
    ic_mean, ic_logvar = m.ic_post(h).chunk(2, dim=1)
    ic_std = torch.sqrt(torch.exp(ic_logvar) + cfg.ic_post_var_min)
    ic = ic_mean + ic_std * torch.randn_like(ic_std) if sample else ic_mean

    B, T, U = x.shape[0], cfg.t_rec, cfg.co_dim
    if U:  # controller input at bin t: forward state of t - lag, backward state of t + lag
        ci_f, ci_b = run_gru(m.ci_enc, x, False), run_gru(m.ci_enc, x, True)
        noise = torch.randn(T, B, U, device=x.device) if sample else None
        c = m.con_h0.expand(B, -1)
    w_fac = F.normalize(m.fac.weight, dim=1)
    g = m.ic_to_g0(ic)
    f = F.linear(m.dropout(g), w_fac)
    gens, facs, co_means, co_stds, us = [], [], [], [], []
    for t in range(T):
        parts = [] if ext is None else [ext[:, t]]
        if U:
            zero, lag = x.new_zeros(B, cfg.ci_enc_dim), cfg.ci_lag
            seen = t < cfg.t_enc  # zeros over the forward-prediction bins
            ci_t = torch.cat([ci_f[:, t - lag] if seen and t >= lag else zero,
                              ci_b[:, t + lag] if seen and t + lag < cfg.t_enc else zero], dim=1)
            con_x = torch.cat([m.dropout(ci_t), m.dropout(f)], dim=1)
            c = gru_step(con_x, c, m.con.weight_ih, m.con.weight_hh, m.con.bias_ih,
                         m.con.bias_hh, cfg.cell_clip)
            mean, logvar = m.co_post(c).chunk(2, dim=1)
            std = torch.sqrt(torch.exp(logvar) + cfg.co_post_var_min)
            u = mean + std * noise[t] if sample else mean
            parts = [u] + parts
            co_means.append(mean), co_stds.append(std), us.append(u)
        gen_x = torch.cat(parts, dim=1) if parts else x.new_zeros(B, 0)
        g = gru_step(gen_x, g, m.gen.weight_ih, m.gen.weight_hh, m.gen.bias_ih, m.gen.bias_hh,
                     cfg.cell_clip)
        f = F.linear(m.dropout(g), w_fac)
        gens.append(g), facs.append(f)
    stack = lambda xs: torch.stack(xs, dim=1) if xs else None  # noqa: E731
    facs = stack(facs)
    out = Output(m.readout(facs), facs, stack(gens), ic_mean, ic_std, stack(co_means),
                 stack(co_stds), stack(us)).float()
    if recon is not None:
        with torch.autocast(x.device.type, enabled=False):  # as in LFADS.forward
            out.losses = m.losses(out, recon, cd_keep)
    return out
