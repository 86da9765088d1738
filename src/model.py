"""LFADS: latent factor analysis via dynamical systems, in one file.

Sussillo et al. 2016 (arXiv:1608.06315) and Pandarinath et al. 2018 (Nature Methods 15:805).
A sequential variational auto-encoder for spike trains: encoders read a trial of spike counts
and infer an initial condition for a generator RNN (and, through a controller, small inputs to
it over time); the generator's state is read out as a few factors, and the factors as a
Poisson rate for every neuron in every bin. Read `LFADS.forward`, then `LFADS.losses`.

Legend, used in every shape comment:
    B trials in a batch       T_enc bins the encoders see   T_rec >= T_enc bins reconstructed
    N_in held-in neurons      N >= N_in neurons reconstructed (held-out columns last)
    E external inputs         H a GRU's hidden units       F factors    U inferred inputs

Several sessions share one model through src/stitch.py (a read-in and read-out per session).
"""

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.scan import decode_scan, gru_scan
from src.utils import autocast_off

LOG_2PI = math.log(2 * math.pi)


@dataclass
class LFADSConfig:
    # data sizes, filled in from the session file
    n_in: int = 0  # N_in, held-in neurons the encoders read
    n_out: int = 0  # N, neurons reconstructed: held-in first, then held-out
    t_enc: int = 0  # T_enc, bins the encoders read
    t_rec: int = 0  # T_rec, bins reconstructed; the last T_rec - T_enc are forward prediction
    ext_dim: int = 0  # E, known external inputs to the generator
    # several sessions (src/stitch.py); the per-session sizes are filled in from the files
    session_n_in: list = field(default_factory=list)  # N_in of each session; empty for one
    session_n_out: list = field(default_factory=list)  # N of each session
    readin_dim: int = 32  # several sessions: the shared encoder input each read-in maps to
    readin_train: bool = True  # several sessions: train the read-ins after their PCR start
    # network sizes; lfads-torch's NLB MC_Maze values in the comments
    ic_enc_dim: int = 64  # units per direction of the initial-condition encoder (MC_Maze: 64)
    ci_enc_dim: int = 64  # units per direction of the controller-input encoder (MC_Maze: 64)
    con_dim: int = 64  # controller units (MC_Maze: 64)
    co_dim: int = 4  # U, inferred inputs; 0 = no controller, an autonomous generator (MC_Maze: 4)
    ic_dim: int = 64  # initial-condition latent dimensions (MC_Maze: 64)
    gen_dim: int = 100  # generator units (MC_Maze: 200; 100 trains the quick start in minutes)
    fac_dim: int = 40  # F, factors; at most a session's fewest neurons if not given (MC_Maze: 100)
    ci_lag: int = 1  # bins: the controller reads bin t only through t-lag and t+lag (MC_Maze: 1)
    # regularisation
    dropout: float = 0.3  # on encoder input, IC encoding, controller input, factors (MC_Maze: 0.3)
    cd_rate: float = 0.3  # coordinated dropout: share of input hidden at each step (MC_Maze: 0.3)
    sv_rate: float = 0.0  # sample validation: share of input elements never trained on
    ic_prior_var: float = 0.1  # variance of the IC prior N(learnable mean, var) (refs: 0.1)
    ic_post_var_min: float = 1e-4  # floor added to the IC posterior variance (refs: 1e-4)
    co_post_var_min: float = 1e-4  # floor added to the inferred-input posterior variance
    co_prior_tau: float = 10.0  # bins: first time constant of the AR(1) input prior (refs: 10)
    co_prior_nvar: float = 0.1  # first innovation variance of the AR(1) input prior (refs: 0.1)
    cell_clip: float = 5.0  # generator and controller states clamped to +-this a step (refs: 5)
    # loss weights, on a reconstruction in nats per trial (summed over bins and neurons): 1 is
    # the ELBO's KL weight (TF LFADS); the lighter default is a beta-VAE, as lfads-torch's
    # (docs/hyperparameters.md converts between the two)
    kl_ic_scale: float = 0.01  # weight of the IC KL (TF LFADS: 1)
    kl_co_scale: float = 0.01  # weight of the inferred-input KL (TF LFADS: 1)
    l2_gen_scale: float = 0.0  # L2 weight on the generator's recurrent matrix (TF LFADS: 2000)
    l2_con_scale: float = 0.0  # L2 weight on the controller's recurrent matrix (TF LFADS: 0)


# -----------------------------------------------------------------------------
# probability helpers


def normal_logprob(x, mean, var):
    return -0.5 * (LOG_2PI + torch.log(var) + (x - mean) ** 2 / var)


def kl_normal(mean_q, var_q, mean_p, var_p):
    """KL(N(mean_q, var_q) || N(mean_p, var_p)), elementwise, analytic."""
    return 0.5 * (torch.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1.0)


def ar1_logprob(u, log_tau, log_nvar):
    """log p(u) under independent AR(1) processes, one per input dimension; u: (B, T, U).

    u_t | u_{t-1} ~ N(a u_{t-1}, nvar), a = exp(-1/tau), nvar the innovation variance, and
    u_0 ~ N(0, nvar / (1 - a^2)), the stationary variance (0.55 at tau 10, nvar 0.1). The prior
    of TF LFADS (prior_ar_nvar) and lfads-torch (AutoregressiveMultivariateNormal), learnable
    through log tau and log nvar. Returns (B,): summed over time and dimensions.
    """
    alpha, nvar = torch.exp(-torch.exp(-log_tau)), torch.exp(log_nvar)  # (U,), (U,)
    lp0 = normal_logprob(u[:, 0], 0.0, nvar / (1 - alpha**2))  # (B, U)
    lpt = normal_logprob(u[:, 1:], alpha * u[:, :-1], nvar)  # (B, T-1, U)
    return lp0.sum(-1) + lpt.sum((1, 2))


def pad_like(mask, counts):
    """A (B, T_enc, N_in) mask of encoder input, False-padded to the (B, T_rec, N) of `counts`:
    held-out neurons and forward-prediction bins are never input."""
    pad = (0, counts.shape[2] - mask.shape[2], 0, counts.shape[1] - mask.shape[1])
    return F.pad(mask.float(), pad) > 0


def log_factorial(k):
    """log k! of integer-valued counts, by table lookup (docs/performance.md)."""
    table = torch.lgamma(torch.arange(int(k.max()) + 2, device=k.device, dtype=k.dtype))
    return table[1:][k.long()]


# -----------------------------------------------------------------------------
# recurrent cells


def gru_cell(input_size: int, hidden_size: int) -> nn.GRUCell:
    """The controller's and generator's GRU: its weights; src/scan.py steps it.
    torch.nn.GRU's form, the reset gate after the recurrent product (W_hn h + b_hn); TF LFADS
    and lfads-torch put it before (W_hn (r * h)). Both are GRUs (Cho et al. 2014); torch's lets
    the encoders and these cells share one definition."""
    cell = nn.GRUCell(input_size, hidden_size)  # torch's default initialisation
    init_gate_bias(cell.bias_ih, hidden_size)
    # a generator without inputs has an empty (3H, 0) matrix: nothing to learn
    cell.weight_ih.requires_grad_(input_size > 0)
    return cell


def init_gate_bias(bias, hidden_size):
    # reset and update gates start at 1, so the state is mostly kept (TF LFADS, lfads-torch)
    with torch.no_grad():
        bias[: 2 * hidden_size] = 1.0


def bidirectional_gru(input_size: int, hidden_size: int) -> nn.GRU:
    gru = nn.GRU(input_size, hidden_size, batch_first=True, bidirectional=True)
    init_gate_bias(gru.bias_ih_l0, hidden_size)
    init_gate_bias(gru.bias_ih_l0_reverse, hidden_size)
    return gru


def bidirectional(grus: list, x) -> list:
    """The outputs of torch.nn.GRU(x) for each bidirectional GRU of `grus` over x (B, T, in),
    time first: (T, B, 2H) each, every direction stepped in one scan (src/scan.py), the
    backward ones reading x in reverse. Without a backward to follow (validation, inference)
    torch's own GRU is faster: its steps loop in C++; float32 there too, out of any
    autocast."""
    if not torch.is_grad_enabled():
        with autocast_off(x.device):
            return [g(x.float())[0].transpose(0, 1) for g in grus]
    H = grus[0].hidden_size
    if any(g.hidden_size != H for g in grus):
        return [out for g in grus for out in bidirectional([g], x)]
    B, D = x.shape[0], len(grus)
    w = lambda name: [getattr(g, name) for g in grus]  # noqa: E731
    w_ih = torch.stack(w("weight_ih_l0") + w("weight_ih_l0_reverse"))  # (2D, 3H, in)
    b_ih = torch.stack(w("bias_ih_l0") + w("bias_ih_l0_reverse"))  # (2D, 3H)
    w_hh = torch.stack(w("weight_hh_l0") + w("weight_hh_l0_reverse"))  # (2D, 3H, H)
    b_hh = torch.stack(w("bias_hh_l0") + w("bias_hh_l0_reverse"))[:, None]  # (2D, 1, 3H)
    x = x.transpose(0, 1)  # (T, B, in)
    x = torch.stack([x, x.flip(0)])  # (2, T, B, in): the backward directions read time flipped
    states = gru_scan(x, w_ih, b_ih, x.new_zeros(2 * D, B, H), w_hh, b_hh)  # (2D, T, B, H)
    return [torch.cat([states[i], states[D + i].flip(0)], 2) for i in range(D)]  # (T, B, 2H)


# -----------------------------------------------------------------------------
# the model


@dataclass
class Output:
    log_rates: torch.Tensor  # (B, T_rec, N), log expected counts per bin
    factors: torch.Tensor  # (B, T_rec, F)
    gen_states: torch.Tensor  # (B, T_rec, H_gen)
    ic_mean: torch.Tensor  # (B, ic_dim)
    ic_std: torch.Tensor  # (B, ic_dim)
    co_mean: torch.Tensor | None  # (B, T_rec, U) inferred-input posterior means
    co_std: torch.Tensor | None  # (B, T_rec, U)
    u: torch.Tensor | None  # (B, T_rec, U) the inputs the generator received
    losses: dict | None = None  # loss terms, nats per trial (LFADS.losses)

    def float(self) -> "Output":
        """Every tensor in float32: under bfloat16 autocast the matrix products return bf16."""
        f = lambda v: v.float() if isinstance(v, torch.Tensor) else v  # noqa: E731
        return Output(*(f(getattr(self, k.name)) for k in fields(self)))


class LFADS(nn.Module):
    def __init__(self, cfg: LFADSConfig):
        super().__init__()
        assert cfg.n_in > 0 and cfg.t_rec >= cfg.t_enc > 0, cfg
        self.cfg = cfg
        # encoders: bidirectional GRUs over the held-in spike counts
        self.ic_enc = bidirectional_gru(cfg.n_in, cfg.ic_enc_dim)
        self.ic_post = nn.Linear(2 * cfg.ic_enc_dim, 2 * cfg.ic_dim)  # -> mean, log variance
        if cfg.co_dim > 0:
            self.ci_enc = bidirectional_gru(cfg.n_in, cfg.ci_enc_dim)
            self.con = gru_cell(2 * cfg.ci_enc_dim + cfg.fac_dim, cfg.con_dim)
            self.con_h0 = nn.Parameter(torch.zeros(cfg.con_dim))
            self.co_post = nn.Linear(cfg.con_dim, 2 * cfg.co_dim)  # -> mean, log variance
            # the AR(1) prior of the inferred inputs, learnable per dimension
            ones = torch.ones(cfg.co_dim)
            self.co_prior_log_tau = nn.Parameter(ones * math.log(cfg.co_prior_tau))
            self.co_prior_log_nvar = nn.Parameter(ones * math.log(cfg.co_prior_nvar))
        # generator, factors, read-out
        self.ic_to_g0 = nn.Linear(cfg.ic_dim, cfg.gen_dim)
        self.gen = gru_cell(cfg.co_dim + cfg.ext_dim, cfg.gen_dim)
        self.fac = nn.Linear(cfg.gen_dim, cfg.fac_dim, bias=False)
        self.ic_prior_mean = nn.Parameter(torch.zeros(cfg.ic_dim))
        self.make_readout()

    def make_readout(self):
        assert self.cfg.n_out >= self.cfg.n_in, self.cfg
        self.readout = nn.Linear(self.cfg.fac_dim, self.cfg.n_out)  # factors -> log rates

    def read_in(self, x):
        return x  # one session: the encoders read the counts themselves

    def read_out(self, f):
        return self.readout(f)  # (B, T_rec, F) -> (B, T_rec, N)

    def init_readout_bias(self, mean_counts: torch.Tensor):
        """Start each neuron's log rate at its mean count per bin: training skips a slow phase."""
        with torch.no_grad():
            self.readout.bias.copy_(torch.log(mean_counts.clamp_min(1e-3)))

    def keep_mask(self, *shape, device=None) -> torch.Tensor:
        """Dropout as a multiplier: 0 with probability p, else 1 / (1 - p); all ones in eval.
        Drawn from uniforms, all steps at once (docs/performance.md)."""
        p = self.cfg.dropout
        if not self.training or p == 0:
            return torch.ones((), device=device).expand(shape)
        return torch.rand(shape, device=device).ge_(p).mul_(1 / (1 - p))

    def dropout(self, x):
        return x * self.keep_mask(*x.shape, device=x.device)

    # --- the whole pass ------------------------------------------------------------

    def forward(self, encod, recon=None, ext=None, sample: bool = True, sv_mask=None) -> Output:
        """encod: (B, T_enc, N_in) counts; recon: (B, T_rec, N) counts, for the loss; ext:
        (B, T_rec, E). `sample` draws from the posteriors, else takes their means. sv_mask:
        (B, T_enc, N_in) bool, True where an element is held out for sample validation."""
        cfg = self.cfg
        x = encod.float()
        if sv_mask is not None:
            # sample validation (lfads-torch): the encoders never see these elements; scaled
            # like dropout, so the whole input after training has the same mean
            x = x * ~sv_mask / (1 - cfg.sv_rate)
        cd_keep = None
        if self.training and cfg.cd_rate > 0:
            # coordinated dropout (Keshtkaran & Pandarinath 2019): hide a random share of the
            # input and learn, in the loss, only from what was hidden
            cd_keep = torch.rand_like(x) >= cfg.cd_rate
            x = x * cd_keep / (1 - cfg.cd_rate)
        x = self.read_in(self.dropout(x))
        ic_mean, ic_std, ci = self.encode(x)  # q(z | x), (B, ic_dim) each; (T_rec, B, 2 H_ci)
        ic = ic_mean + ic_std * torch.randn_like(ic_std) if sample else ic_mean
        gens, facs, co_mean, co_std, u = self.generate(ic, ci, ext, sample)
        log_rates = self.read_out(facs)  # (B, T_rec, F) -> (B, T_rec, N)
        out = Output(log_rates, facs, gens, ic_mean, ic_std, co_mean, co_std, u).float()
        if recon is not None:
            # the loss in float32 even under autocast: bfloat16's 8-bit mantissa loses the last
            # digits of a likelihood summed over thousands of bins
            with autocast_off(x.device):
                out.losses = self.losses(out, recon, cd_keep, sv_mask, n_in=encod.shape[2])
        return out

    # --- encoders ------------------------------------------------------------

    def encode(self, x):
        """The encoders over x (B, T_enc, N_in): the IC posterior's mean and std (B, ic_dim)
        from the final states of the IC encoder's two directions, and the controller's inputs
        (T_rec, B, 2 H_ci), time first (None without a controller)."""
        cfg = self.cfg
        grus = [self.ic_enc, self.ci_enc] if cfg.co_dim else [self.ic_enc]
        states = bidirectional(grus, x)  # each (T_enc, B, 2 H)
        H = cfg.ic_enc_dim
        h = self.dropout(torch.cat([states[0][-1, :, :H], states[0][0, :, H:]], dim=1))
        mean, logvar = self.ic_post(h).chunk(2, dim=1)  # (B, ic_dim) each
        std = torch.sqrt(torch.exp(logvar) + cfg.ic_post_var_min)
        return mean, std, (self.lagged(states[1]) if cfg.co_dim else None)

    def lagged(self, states):
        """Controller inputs, (T_rec, B, 2 H_ci) from the CI encoder's states (T_enc, B, 2 H_ci):
        the forward half delayed and the backward half advanced by ci_lag, so the controller
        never reads bin t's own spikes at step t; zeros over forward prediction."""
        cfg, lag = self.cfg, self.cfg.ci_lag
        fwd, bwd = states[..., : cfg.ci_enc_dim], states[..., cfg.ci_enc_dim :]
        if lag > 0:
            fwd = F.pad(fwd, (0, 0, 0, 0, lag, 0))[:-lag]  # the state of t - lag at t
            bwd = F.pad(bwd, (0, 0, 0, 0, 0, lag))[lag:]  # the state of t + lag at t
        ci = torch.cat([fwd, bwd], dim=2)
        return F.pad(ci, (0, 0, 0, 0, 0, cfg.t_rec - cfg.t_enc))

    # --- generator and controller ------------------------------------------------

    def generate(self, ic, ci, ext, sample: bool):
        """The controller and the generator over T_rec steps from the IC sample. Per step t:

            c_t = GRU_con([ci_t, f_{t-1}], c_{t-1})      controller
            u_t ~ N(mean(c_t), std(c_t)^2)               inferred input (its mean if not sample)
            g_t = GRU_gen([u_t, ext_t], g_{t-1})         generator
            f_t = W_fac g_t                              factors

        with dropout on ci, f_{t-1} and g_t, g_0 = W_ic z, f_0 = W_fac g_0, and W_fac's rows of
        unit norm: the read-out's weights alone then set each factor's scale in the rates, and
        the L2-free generator cannot grow its factors to escape the dropout (lfads-torch's
        factor layer). Returns g, f and u's posterior means, stds and samples, each
        (B, T_rec, .); the last three None when co_dim is 0. The steps run in src/scan.py."""
        cfg = self.cfg
        B, T, U = ic.shape[0], cfg.t_rec, cfg.co_dim
        g0 = self.ic_to_g0(ic).float()  # (B, H_gen), g_0: unclipped, as in the references
        w_fac = F.normalize(self.fac.weight, dim=1)  # (F, H_gen)
        keep_g = self.keep_mask(T + 1, B, cfg.gen_dim, device=g0.device)  # (T_rec + 1, B, H_gen)
        if not U:  # an autonomous generator: one GRU, and the factors in one product
            ext = g0.new_zeros(T, B, 0) if ext is None else ext.transpose(0, 1)  # (T, B, E)
            gens = gru_scan(ext[None], self.gen.weight_ih[None], self.gen.bias_ih[None], g0[None],
                            self.gen.weight_hh[None], self.gen.bias_hh.view(1, 1, -1),
                            cfg.cell_clip)[0]
            facs = F.linear(gens * keep_g[1:], w_fac)  # (T_rec, B, F)
            return gens.transpose(0, 1), facs.transpose(0, 1), None, None, None
        w_u, w_ext = self.gen.weight_ih.split([U, cfg.ext_dim], dim=1)
        gen_x = self.gen.bias_ih.expand(T, B, -1)  # (T_rec, B, 3 H_gen): all but u_t's input
        if cfg.ext_dim:
            gen_x = gen_x + F.linear(ext.transpose(0, 1), w_ext)
        w_ci, w_f = self.con.weight_ih.split([2 * cfg.ci_enc_dim, cfg.fac_dim], dim=1)
        con_x = F.linear(self.dropout(ci), w_ci, self.con.bias_ih)  # (T_rec, B, 3 H_con)
        keep_f = self.keep_mask(T, B, cfg.fac_dim, device=g0.device)  # (T_rec, B, F)
        noise = torch.randn(T, B, U, device=g0.device) if sample else g0.new_zeros(T, B, U)
        outs = decode_scan(con_x, gen_x, self.con_h0.expand(B, -1), g0, self.con.weight_hh,
                           self.con.bias_hh, w_f, self.co_post.weight, self.co_post.bias, w_u,
                           self.gen.weight_hh, self.gen.bias_hh, w_fac, keep_f, keep_g, noise,
                           cfg.cell_clip, cfg.co_post_var_min)
        return tuple(o.transpose(0, 1) for o in outs)  # (T_rec, B, .) -> (B, T_rec, .)

    # --- the loss ------------------------------------------------------------------

    def losses(self, out: Output, recon, cd_keep=None, sv_mask=None, n_in=None) -> dict:
        """Loss terms, each in nats per trial (a mean over the batch) before any weight.
        n_in: held-in neurons, the columns of `recon` the encoders read (default cfg.n_in)."""
        cfg = self.cfg
        n_in = n_in or cfg.n_in
        k = recon.float()
        nll = torch.exp(out.log_rates) - k * out.log_rates + log_factorial(k)  # (B, T_rec, N)
        # held-in neurons over encoder bins: what model selection follows (src/trainer.py); it
        # holds none of the held-out neurons and forward-prediction bins that are scored
        terms = {"recon_heldin": nll[:, : cfg.t_enc, :n_in].sum((1, 2)).mean().detach()}
        if sv_mask is not None:
            # sample validation: the held-out elements' cost is logged, never trained on; both
            # parts are scaled to the size of the whole held-in block
            sv = pad_like(sv_mask, k)  # (B, T_enc, N_in) -> (B, T_rec, N)
            heldin = pad_like(torch.ones_like(sv_mask), k)  # the encoder block, (B, T_rec, N)
            rate = cfg.sv_rate
            terms["recon_sv"] = torch.where(sv, nll, 0.0).sum((1, 2)).mean().detach() / rate
            nll = torch.where(sv, 0.0, torch.where(heldin, nll / (1 - rate), nll))
        if cd_keep is not None:
            # gradient only through the elements the encoders did not see; the value unchanged
            seen = pad_like(cd_keep, k)  # (B, T_enc, N_in) -> (B, T_rec, N)
            nll = torch.where(seen, nll.detach(), nll)
        ic_var_p = torch.full_like(out.ic_mean, cfg.ic_prior_var)
        kl_ic = kl_normal(out.ic_mean, out.ic_std**2, self.ic_prior_mean, ic_var_p).sum(1)
        terms.update(recon=nll.sum((1, 2)).mean(), kl_ic=kl_ic.mean())
        if cfg.co_dim:
            # KL(q || AR1) at the sampled path: q(u_t) depends on earlier samples through the
            # factors, so it has no closed form (TF LFADS, lfads-torch). E_q[log q] is exact
            # per step: minus the Gaussian entropy.
            neg_entropy = -0.5 * (LOG_2PI + 1 + torch.log(out.co_std**2)).sum((1, 2))
            log_p = ar1_logprob(out.u, self.co_prior_log_tau, self.co_prior_log_nvar)
            terms["kl_co"] = (neg_entropy - log_p).mean()
        else:
            terms["kl_co"] = torch.zeros((), device=k.device)
        terms["l2"] = self.l2_penalty()
        return terms

    def l2_penalty(self):
        """L2 on the recurrent weights as TF LFADS and lfads-torch weigh it: the sum over the
        penalised matrices of scale * 0.5 * squared norm, divided by their total entry count."""
        cfg = self.cfg
        mats = [(cfg.l2_gen_scale, self.gen.weight_hh)]
        if cfg.co_dim:
            mats.append((cfg.l2_con_scale, self.con.weight_hh))
        mats = [(scale, w) for scale, w in mats if scale > 0]
        if not mats:
            return self.gen.weight_hh.new_zeros(())
        return sum(scale * 0.5 * w.pow(2).sum() for scale, w in mats) / sum(
            w.numel() for _, w in mats)

    def total_loss(self, terms: dict, kl_weight: float, l2_weight: float):
        """The training objective: reconstruction + ramped, scaled KL + ramped L2."""
        cfg = self.cfg
        kl = cfg.kl_ic_scale * terms["kl_ic"] + cfg.kl_co_scale * terms["kl_co"]
        return terms["recon"] + kl_weight * kl + l2_weight * terms["l2"]

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> dict:
        """n trials drawn from the model itself, no data: z from the IC prior N(ic_prior_mean,
        ic_prior_var), inputs u_t from the AR(1) prior (u_0 at its stationary variance
        nvar / (1 - a^2), then u_t = a u_{t-1} + N(0, nvar), a = exp(-1/tau)), external inputs
        zero, and the generator run step by step without dropout. Returns {"rates" (n, T_rec,
        N) expected counts per bin, "factors" (n, T_rec, F), "ic" (n, ic_dim), "inputs"
        (n, T_rec, co_dim) or None}."""
        cfg, dev = self.cfg, self.ic_prior_mean.device
        noise = lambda *shape: torch.randn(*shape, generator=generator, device=dev)  # noqa: E731
        z = self.ic_prior_mean + math.sqrt(cfg.ic_prior_var) * noise(n, cfg.ic_dim)  # (n, ic_dim)
        u = None
        if cfg.co_dim:
            a = torch.exp(-torch.exp(-self.co_prior_log_tau))  # (co_dim,)
            nvar = torch.exp(self.co_prior_log_nvar)  # (co_dim,)
            u = [torch.sqrt(nvar / (1 - a**2)) * noise(n, cfg.co_dim)]
            for _ in range(cfg.t_rec - 1):
                u.append(a * u[-1] + torch.sqrt(nvar) * noise(n, cfg.co_dim))
            u = torch.stack(u, 1)  # (n, T_rec, co_dim)
        g, w_fac, facs = self.ic_to_g0(z), F.normalize(self.fac.weight, dim=1), []
        ext = torch.zeros(n, cfg.ext_dim, device=dev)
        for t in range(cfg.t_rec):
            x = torch.cat([u[:, t] if u is not None else ext[:, :0], ext], 1)  # (n, co + ext)
            g = self.gen(x, g).clamp(-cfg.cell_clip, cfg.cell_clip)  # (n, H_gen)
            facs.append(F.linear(g, w_fac))  # (n, F)
        f = torch.stack(facs, 1)  # (n, T_rec, F)
        return {"rates": torch.exp(self.read_out(f)), "factors": f, "ic": z, "inputs": u}
