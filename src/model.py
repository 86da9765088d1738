"""LFADS: latent factor analysis via dynamical systems, in one file.

Sussillo et al. 2016 (arXiv:1608.06315) and Pandarinath et al. 2018 (Nature Methods 15:805).
A sequential variational auto-encoder for spike trains: encoders read a trial of spike counts
and infer an initial condition for a generator RNN (and, through a controller, small inputs
to it over time); the generator's state is read out as a few factors, and the factors as a
Poisson rate for every neuron in every bin.

Legend, used in every shape comment:
    B trials in a batch       T_enc bins the encoders see   T_rec >= T_enc bins reconstructed
    N_in held-in neurons      N >= N_in neurons reconstructed (held-out columns last)
    E external inputs         H a GRU's hidden units       F factors    U inferred inputs
    R shared encoder input of several stitched sessions (readin_dim)

Several sessions (stitching): each session s has its own N_in and N; a linear read-in maps its
held-in counts to R shared dimensions that the encoders read, and its own read-out maps the
shared factors to its N neurons. Encoders, controller and generator are shared.
"""

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


@dataclass
class LFADSConfig:
    # data sizes: filled in from the session file (src/data.py), not set by hand
    n_in: int = 0  # N_in, held-in neurons the encoders read
    n_out: int = 0  # N, neurons reconstructed: held-in first, then held-out
    t_enc: int = 0  # T_enc, bins the encoders read
    t_rec: int = 0  # T_rec, bins reconstructed; the last T_rec - T_enc are forward prediction
    ext_dim: int = 0  # E, known external inputs to the generator
    # several sessions (stitching, Pandarinath et al. 2018): sizes filled in from the files;
    # n_in and n_out are then 0 and each session has its own read-in and read-out
    session_n_in: list = field(default_factory=list)  # N_in of each session; [] = one session
    session_n_out: list = field(default_factory=list)  # N of each session
    readin_dim: int = 32  # several sessions: dimensions of the shared encoder input that each
    #                       session's read-in maps its neurons to; unused for one session
    readin_train: bool = True  # several sessions: train the read-ins (False: keep their
    #                            principal-component-regression initialisation, src/stitch.py)
    # network sizes; lfads-torch's NLB MC_Maze values in brackets
    ic_enc_dim: int = 64  # units per direction of the initial-condition encoder GRU [64]
    ci_enc_dim: int = 64  # units per direction of the controller-input encoder GRU [64]
    con_dim: int = 64  # controller GRU units [64]
    co_dim: int = 4  # U, inferred input dimensions; 0 = autonomous generator, no controller [4]
    ic_dim: int = 64  # initial-condition latent dimensions [64]
    gen_dim: int = 100  # generator GRU units [200]; 100 trains the quick start in minutes
    fac_dim: int = 40  # F, factors, at most the fewest neurons of a session unless given [100]
    ci_lag: int = 1  # bins: the controller sees the data at t only through t-lag and t+lag [1]
    # regularisation
    dropout: float = 0.3  # probability, on encoder input, IC encoding, controller input and
    #                       the generator state read by the factors [0.3]
    cd_rate: float = 0.3  # coordinated dropout: share of input elements hidden per step [0.3]
    sv_rate: float = 0.0  # sample validation: share of input elements held out of training by
    #                       a fixed mask (src/trainer.py), their cost logged as recon_sv to see
    #                       over-fitting without ground truth [lfads-torch on real data: ~0.1]
    ic_prior_var: float = 0.1  # fixed variance of the IC prior N(learnable mean, var) [0.1]
    ic_post_var_min: float = 1e-4  # floor added to the IC posterior variance [1e-4]
    co_post_var_min: float = 1e-4  # floor added to the inferred-input posterior variance
    co_prior_tau: float = 10.0  # bins, initial time constant of the AR(1) input prior [10]
    co_prior_nvar: float = 0.1  # initial innovation (step-to-step) variance of the AR(1) input
    #                             prior; its stationary variance is nvar / (1 - a^2), 0.55 at
    #                             tau 10 [0.1, lfads-torch nvar, TF LFADS prior_ar_nvar]
    cell_clip: float = 5.0  # bound on generator and controller states, applied after every
    #                        step (TF LFADS cell_clip_value, lfads-torch cell_clip: 5)
    # loss weights; the reconstruction is in nats per trial (summed over bins and neurons).
    # With cd_rate 0, KL scales of 1 make the loss the negative ELBO (TF LFADS). Coordinated
    # dropout lets only the hidden cd_rate share of held-in elements carry reconstruction
    # gradient, so there the KL weighs about 1 / cd_rate times its ELBO weight. The defaults
    # weigh it far lighter, as lfads-torch's NLB configurations do (1e-7 on its per-element
    # mean, about 3e-4 of the ELBO's weight): the full weight trains slowly and underfits on
    # shallow modulation (docs/panel.md); dropout, coordinated dropout and the plateau stop
    # keep the light KL from over-fitting
    kl_ic_scale: float = 0.01  # weight of the IC KL, on nats per trial [TF LFADS: 1]
    kl_co_scale: float = 0.01  # weight of the inferred-input KL, on nats per trial [TF: 1]
    l2_gen_scale: float = 0.0  # L2 weight of the generator's recurrent matrix: scale x 0.5
    #                            x sum of squares / entries of the penalised matrices [TF: 2000,
    #                            lfads-torch NLB: 0]
    l2_con_scale: float = 0.0  # the same for the controller's recurrent matrix [TF: 0]


# -----------------------------------------------------------------------------
# probability helpers


def normal_logprob(x, mean, var):
    return -0.5 * (LOG_2PI + torch.log(var) + (x - mean) ** 2 / var)


def kl_normal(mean_q, var_q, mean_p, var_p):
    """KL(N(mean_q, var_q) || N(mean_p, var_p)), elementwise, analytic."""
    return 0.5 * (torch.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1.0)


def ar1_logprob(u, log_tau, log_nvar):
    """log p(u) under independent AR(1) processes, one per input dimension; u: (B, T, U).

    u_t | u_{t-1} ~ N(a u_{t-1}, nvar) with a = exp(-1/tau) and nvar the innovation variance;
    u_0 ~ N(0, nvar / (1 - a^2)), the stationary variance, so every step has that marginal.
    The prior of TF LFADS (prior_ar_nvar) and lfads-torch (AutoregressiveMultivariateNormal),
    parametrised as there by log tau and log nvar. Returns (B,): summed over time and dimensions.
    """
    alpha, nvar = torch.exp(-torch.exp(-log_tau)), torch.exp(log_nvar)  # (U,), (U,)
    lp0 = normal_logprob(u[:, 0], 0.0, nvar / (1 - alpha**2))  # (B, U)
    lpt = normal_logprob(u[:, 1:], alpha * u[:, :-1], nvar)  # (B, T-1, U)
    return lp0.sum(-1) + lpt.sum((1, 2))


def pad_like(mask, counts):
    """A (B, T_enc, N_in) bool mask of encoder input, False-padded to the (B, T_rec, N) of the
    reconstructed counts: held-out neurons and forward-prediction bins are never input. Sizes
    come from the tensors, not the config: they differ between stitched sessions."""
    pad = (0, counts.shape[2] - mask.shape[2], 0, counts.shape[1] - mask.shape[1])
    return F.pad(mask.float(), pad) > 0


def log_factorial(k):
    """log k! of integer-valued counts, through a table: lgamma over every element of a batch
    costs more on a CPU than all the dropout masks of a step."""
    table = torch.lgamma(torch.arange(int(k.max()) + 2, device=k.device, dtype=k.dtype))
    return table[1:][k.long()]


# -----------------------------------------------------------------------------
# recurrent cells


class GRUCell(nn.Module):
    """A GRU step with the input projection done by the caller, for all steps at once.

        r, z = sigmoid(W_ir x + b_ir + W_hr h + b_hr),  sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n    = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        h'   = clamp(z * h + (1 - z) * n, -clip, clip)

    This is torch.nn.GRU's (and cuDNN's) form, with the reset gate after the recurrent product;
    TF LFADS and lfads-torch put it before (W_hn (r * h)). Both are GRUs (Cho et al. 2014
    discuss both); we take torch's so that the fused bidirectional encoders and these
    per-step cells are one and the same definition, tested against torch.nn.GRUCell, and so
    that a step needs one matrix product instead of two.
    """

    def __init__(self, input_size: int, hidden_size: int, clip: float = math.inf):
        super().__init__()
        self.clip = clip  # the references clamp generator and controller states (cell_clip)
        ref = nn.GRUCell(input_size, hidden_size)  # borrow torch's default initialisation
        self.weight_ih, self.weight_hh = ref.weight_ih, ref.weight_hh  # (3H, in), (3H, H)
        self.bias_ih, self.bias_hh = ref.bias_ih, ref.bias_hh  # (3H,), (3H,)
        init_gate_bias(self.bias_ih, hidden_size)
        # an autonomous generator (no inferred or external inputs) has an empty (3H, 0) input
        # matrix: nothing to learn, and DistributedDataParallel would wait for its gradient
        self.weight_ih.requires_grad_(input_size > 0)

    def project(self, x):
        return F.linear(x, self.weight_ih, self.bias_ih)  # (..., in) -> (..., 3H)

    def forward(self, x_proj, h):
        hh = torch.addmm(self.bias_hh, h, self.weight_hh.t())  # (B, 3H)
        # split, not slices: the backward of a split is one concatenation, while each slice
        # would fill a zero tensor of the full size and copy its gradient into it
        x_rz, x_n = x_proj.split([2 * h.shape[1], h.shape[1]], dim=1)  # (B, 2H), (B, H)
        h_rz, h_n = hh.split([2 * h.shape[1], h.shape[1]], dim=1)
        r, z = torch.sigmoid(x_rz + h_rz).chunk(2, dim=1)  # (B, H) each
        # fused forms, one kernel and one autograd node each instead of two or three:
        # addcmul(a, b, c) = a + b * c, lerp(n, h, z) = n + z * (h - n)
        # (lerp wants one dtype: under bf16 autocast n and z are bf16, the state stays float32)
        n = torch.tanh(torch.addcmul(x_n, r, h_n))
        h = torch.lerp(n.type_as(h), h, z.type_as(h))
        return h if self.clip == math.inf else h.clamp(-self.clip, self.clip)


def init_gate_bias(bias, hidden_size):
    # reset and update gates start at bias 1: the update gate then keeps most of the state
    # (TF LFADS's forget bias of 1; lfads-torch sets both gates so)
    with torch.no_grad():
        bias[: 2 * hidden_size] = 1.0


def bidirectional_gru(input_size: int, hidden_size: int) -> nn.GRU:
    gru = nn.GRU(input_size, hidden_size, batch_first=True, bidirectional=True)
    init_gate_bias(gru.bias_ih_l0, hidden_size)
    init_gate_bias(gru.bias_ih_l0_reverse, hidden_size)
    return gru


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
    losses: dict | None = None  # loss terms, nats per trial (see LFADS.losses)

    def float(self) -> "Output":
        """Every tensor in float32: under bfloat16 autocast the matrix products return bf16."""
        f = lambda v: v.float() if isinstance(v, torch.Tensor) else v  # noqa: E731
        return Output(*(f(getattr(self, k.name)) for k in fields(self)))


class LFADS(nn.Module):
    def __init__(self, cfg: LFADSConfig):
        super().__init__()
        self.stitched = len(cfg.session_n_in) > 0
        n_in = cfg.readin_dim if self.stitched else cfg.n_in  # what the encoders read
        sizes = zip(cfg.session_n_in, cfg.session_n_out) if self.stitched else [(n_in, cfg.n_out)]
        assert all(0 < a <= b for a, b in sizes) and cfg.t_rec >= cfg.t_enc > 0, cfg
        assert not self.stitched or len(cfg.session_n_in) == len(cfg.session_n_out) and n_in > 0
        self.cfg = cfg
        # encoders: bidirectional GRUs over the held-in spike counts (or their read-ins)
        self.ic_enc = bidirectional_gru(n_in, cfg.ic_enc_dim)
        self.ic_post = nn.Linear(2 * cfg.ic_enc_dim, 2 * cfg.ic_dim)  # -> mean, log variance
        if cfg.co_dim > 0:
            self.ci_enc = bidirectional_gru(n_in, cfg.ci_enc_dim)
            self.con = GRUCell(2 * cfg.ci_enc_dim + cfg.fac_dim, cfg.con_dim, cfg.cell_clip)
            self.con_h0 = nn.Parameter(torch.zeros(cfg.con_dim))
            self.co_post = nn.Linear(cfg.con_dim, 2 * cfg.co_dim)  # -> mean, log variance
            # AR(1) prior on inferred inputs, learnable per dimension (lfads-torch MultiVariateAR1)
            ones = torch.ones(cfg.co_dim)
            self.co_prior_log_tau = nn.Parameter(ones * math.log(cfg.co_prior_tau))
            self.co_prior_log_nvar = nn.Parameter(ones * math.log(cfg.co_prior_nvar))
        # generator, factors, read-out
        self.ic_to_g0 = nn.Linear(cfg.ic_dim, cfg.gen_dim)
        self.gen = GRUCell(cfg.co_dim + cfg.ext_dim, cfg.gen_dim, cfg.cell_clip)
        self.fac = nn.Linear(cfg.gen_dim, cfg.fac_dim, bias=False)
        if not self.stitched:
            self.readout = nn.Linear(cfg.fac_dim, cfg.n_out)
        self.ic_prior_mean = nn.Parameter(torch.zeros(cfg.ic_dim))
        if self.stitched:  # created last: one session's weights draw the same numbers as ever
            # read-ins with a bias: the PCR initialisation (src/stitch.py) centres each
            # session's counts through it
            self.readin = nn.ModuleList(nn.Linear(n, cfg.readin_dim) for n in cfg.session_n_in)
            self.readin.requires_grad_(cfg.readin_train)
            self.readout = nn.ModuleList(nn.Linear(cfg.fac_dim, n) for n in cfg.session_n_out)

    def readout_of(self, session: int) -> nn.Linear:
        return self.readout[session] if self.stitched else self.readout

    def keep_mask(self, *shape, device=None) -> torch.Tensor:
        """Dropout as a multiplier: 0 with probability p, else 1 / (1 - p); all ones in eval.

        nn.Dropout draws Bernoulli samples, which on a CPU cost three times as much as the
        uniform ones drawn here; masks for every time step are drawn at once for the same reason.
        """
        p = self.cfg.dropout
        if not self.training or p == 0:
            return torch.ones((), device=device).expand(shape)
        return torch.rand(shape, device=device).ge_(p).mul_(1 / (1 - p))

    def dropout(self, x):
        return x * self.keep_mask(*x.shape, device=x.device)

    def init_readout_bias(self, mean_counts: torch.Tensor, session: int = 0):
        """Start each neuron's log rate at its mean count per bin: training skips a slow phase."""
        with torch.no_grad():
            self.readout_of(session).bias.copy_(torch.log(mean_counts.clamp_min(1e-3)))

    # --- encoders ------------------------------------------------------------

    def encode_ic(self, x):
        _, h_n = self.ic_enc(x)  # h_n: (2, B, H_ic), final forward and backward states
        h = self.dropout(torch.cat([h_n[0], h_n[1]], dim=1))  # (B, 2 H_ic)
        mean, logvar = self.ic_post(h).chunk(2, dim=1)  # (B, ic_dim) each
        return mean, torch.sqrt(torch.exp(logvar) + self.cfg.ic_post_var_min)

    def encode_ci(self, x):
        """Controller inputs, (B, T_rec, 2 H_ci): the forward half delayed and the backward half
        advanced by ci_lag, so the controller never reads bin t's own spikes at step t."""
        cfg = self.cfg
        out, _ = self.ci_enc(x)  # (B, T_enc, 2 H_ci)
        fwd, bwd = out[..., : cfg.ci_enc_dim], out[..., cfg.ci_enc_dim :]
        lag = cfg.ci_lag
        if lag > 0:
            fwd = F.pad(fwd, (0, 0, lag, 0))[:, :-lag]  # state of t - lag at t
            bwd = F.pad(bwd, (0, 0, 0, lag))[:, lag:]  # state of t + lag at t
        ci = torch.cat([fwd, bwd], dim=2)
        return F.pad(ci, (0, 0, 0, cfg.t_rec - cfg.t_enc))  # zeros over forward-prediction bins

    # --- generator and controller ------------------------------------------------

    def generate(self, ic, ci, ext, sample: bool):
        """The controller and the generator over T_rec steps from the IC sample. Per step t:

            c_t = GRU_con([ci_t, f_{t-1}], c_{t-1})      controller
            u_t ~ N(mean(c_t), std(c_t)^2)               inferred input (its mean if not sample)
            g_t = GRU_gen([u_t, ext_t], g_{t-1})         generator
            f_t = W_fac g_t                              factors

        with dropout on f_{t-1} and g_t, g_0 = W_ic z and f_0 = W_fac g_0. Returns g, f and u's
        posterior means, stds and samples, each (B, T_rec, .); the last three None when co_dim
        is 0. The recurrence stays in one loop, so that it reads as the four lines above."""
        cfg = self.cfg
        B, T, U = ic.shape[0], cfg.t_rec, cfg.co_dim
        g = self.ic_to_g0(ic)  # (B, H_gen), g_0: unclipped, as in the references
        w_fac = F.normalize(self.fac.weight, dim=1)  # (F, H_gen): unit-norm rows, as in the refs
        keep_g = self.keep_mask(T + 1, B, cfg.gen_dim, device=g.device)  # (T_rec + 1, B, H_gen)
        gen_in, gen_w_u = self.generator_inputs(ext, B)  # T_rec x (B, 3 H_gen), (3 H_gen, U)
        if U:
            con_in, con_w_f = self.controller_inputs(ci)  # T_rec x (B, 3 H_con), (3 H_con, F)
            keep_f = self.keep_mask(T, B, cfg.fac_dim, device=g.device)  # (T_rec, B, F)
            noise = torch.randn(T, B, U, device=g.device) if sample else g.new_zeros(T, B, U)
            c = self.con_h0.expand(B, -1)  # (B, H_con)
            f = F.linear(g * keep_g[0], w_fac)  # (B, F)
        gens, facs, co_means, co_stds, us = [], [], [], [], []
        for t in range(T):
            x_gen = gen_in[t]
            if U:
                c = self.con(con_in[t] + F.linear(f * keep_f[t], con_w_f), c)  # (B, H_con)
                mean, logvar = self.co_post(c).chunk(2, dim=1)  # (B, U) each
                std = torch.sqrt(torch.exp(logvar) + cfg.co_post_var_min)
                u = mean + std * noise[t]
                x_gen = x_gen + F.linear(u, gen_w_u)
                co_means.append(mean), co_stds.append(std), us.append(u)
            g = self.gen(x_gen, g)  # (B, H_gen)
            gens.append(g)
            if U:  # the controller reads these factors at the next step
                f = F.linear(g * keep_g[t + 1], w_fac)
                facs.append(f)
        stack = lambda xs: torch.stack(xs, dim=1) if xs else None  # noqa: E731  T x (B, D) -> (B, T, D)
        gens = stack(gens)  # (B, T_rec, H_gen)
        # without a controller nothing inside the loop needs the factors: one product for all
        facs = stack(facs) if U else F.linear(gens * keep_g[1:].transpose(0, 1), w_fac)
        return gens, facs, stack(co_means), stack(co_stds), stack(us)

    # The next two project the inputs of all steps in one product each, outside the time loop,
    # and split them with unbind: each [:, t] would scatter its gradient into a zero tensor of
    # the whole (B, T, .) size, T^2 work (docs/performance.md measures the whole fast path).

    def generator_inputs(self, ext, B: int) -> tuple:
        """The generator's input projection of every step but that of u_t (which the controller
        makes inside the loop): T_rec x (B, 3 H_gen), and the matrix of u_t, (3 H_gen, U)."""
        cfg = self.cfg
        w_u, w_ext = self.gen.weight_ih.split([cfg.co_dim, cfg.ext_dim], dim=1)
        gen_in = self.gen.bias_ih.expand(B, cfg.t_rec, -1)  # (B, T_rec, 3 H_gen)
        if cfg.ext_dim:
            gen_in = gen_in + F.linear(ext, w_ext)
        return gen_in.unbind(1), w_u

    def controller_inputs(self, ci) -> tuple:
        """The controller's input projection of the encoding ci (with dropout) at every step:
        T_rec x (B, 3 H_con), and the matrix of the factors it also reads, (3 H_con, F)."""
        cfg = self.cfg
        w_ci, w_f = self.con.weight_ih.split([2 * cfg.ci_enc_dim, cfg.fac_dim], dim=1)
        con_in = F.linear(self.dropout(ci), w_ci, self.con.bias_ih)  # (B, T_rec, 3 H_con)
        return con_in.unbind(1), w_f

    # --- the whole pass ------------------------------------------------------------

    def forward(self, encod, recon=None, ext=None, sample: bool = True, sv_mask=None,
                session: int = 0) -> Output:
        """encod: (B, T_enc, N_in) counts; recon: (B, T_rec, N) counts, for the loss; ext:
        (B, T_rec, E). `sample` draws from the posteriors, else uses their means. sv_mask:
        (B, T_enc, N_in) bool, True where an element is held out for sample validation.
        session: which session's read-in and read-out, when several are stitched."""
        cfg = self.cfg
        x = encod.float()
        if sv_mask is not None:
            # sample validation (lfads-torch): the encoders never see these elements; scaled
            # like dropout so that the full input, unmasked after training, has the same mean
            x = x * ~sv_mask / (1 - cfg.sv_rate)
        cd_keep = None
        if self.training and cfg.cd_rate > 0:
            # coordinated dropout (Keshtkaran & Pandarinath 2019): hide a random share of the
            # input and, in the loss below, learn only from what was hidden
            cd_keep = torch.rand_like(x) >= cfg.cd_rate
            x = x * cd_keep / (1 - cfg.cd_rate)
        x = self.dropout(x)
        if self.stitched:  # dropout above acts on neurons, as for one session
            x = self.readin[session](x)  # (B, T_enc, N_in) -> (B, T_enc, R)
        ic_mean, ic_std = self.encode_ic(x)
        ic = ic_mean + ic_std * torch.randn_like(ic_std) if sample else ic_mean
        ci = self.encode_ci(x) if cfg.co_dim else None
        gens, facs, co_mean, co_std, u = self.generate(ic, ci, ext, sample)
        log_rates = self.readout_of(session)(facs)  # (B, T_rec, F) -> (B, T_rec, N)
        out = Output(log_rates, facs, gens, ic_mean, ic_std, co_mean, co_std, u).float()
        if recon is not None:
            # the loss in float32 even under autocast: a Poisson likelihood summed over
            # thousands of bins loses its last digits in bfloat16's 8-bit mantissa
            with torch.autocast(x.device.type, enabled=False):
                out.losses = self.losses(out, recon, cd_keep, sv_mask, session)
        return out

    def losses(self, out: Output, recon, cd_keep=None, sv_mask=None, session: int = 0) -> dict:
        """Loss terms, each in nats per trial (mean over the batch) before any weight."""
        cfg = self.cfg
        k = recon.float()
        nll = torch.exp(out.log_rates) - k * out.log_rates + log_factorial(k)  # (B, T_rec, N)
        n_in = cfg.session_n_in[session] if self.stitched else cfg.n_in
        t_enc = cfg.t_enc
        # held-in neurons over encoder bins: what model selection and the plateau stop follow
        # (src/trainer.py), as it holds neither the held-out neurons nor the forward-prediction
        # bins that co-bps and fp-bps score
        terms = {"recon_heldin": nll[:, :t_enc, :n_in].sum((1, 2)).mean().detach()}
        if sv_mask is not None:
            # sample validation (lfads-torch SampleValidation): the held-out elements' cost is
            # logged, never trained on; both parts are scaled by the share they stand for, so
            # that each is on the scale of the whole held-in block
            sv = pad_like(sv_mask, k)  # (B, T_enc, N_in) -> (B, T_rec, N)
            heldin = pad_like(torch.ones_like(sv_mask), k)  # the encoder block, (B, T_rec, N)
            rate = cfg.sv_rate
            terms["recon_sv"] = torch.where(sv, nll, 0.0).sum((1, 2)).mean().detach() / rate
            nll = torch.where(sv, 0.0, torch.where(heldin, nll / (1 - rate), nll))
        if cd_keep is not None:
            # gradient only through elements the encoders did not see; the value is unchanged.
            # Held-out neurons and forward-prediction bins are never seen, so always count.
            seen = pad_like(cd_keep, k)  # (B, T_enc, N_in) -> (B, T_rec, N)
            nll = torch.where(seen, nll.detach(), nll)
        ic_var_p = torch.full_like(out.ic_mean, cfg.ic_prior_var)
        kl_ic = kl_normal(out.ic_mean, out.ic_std**2, self.ic_prior_mean, ic_var_p).sum(1)
        terms.update(recon=nll.sum((1, 2)).mean(), kl_ic=kl_ic.mean())
        if cfg.co_dim:
            # KL(q || AR1) estimated at the sampled path: the posterior of u_t depends on earlier
            # samples through the factors, so the KL has no closed form (TF LFADS, lfads-torch).
            # E_q[log q] is exact per step: minus the Gaussian entropy.
            neg_entropy = -0.5 * (LOG_2PI + 1 + torch.log(out.co_std**2)).sum((1, 2))
            log_p = ar1_logprob(out.u, self.co_prior_log_tau, self.co_prior_log_nvar)
            terms["kl_co"] = (neg_entropy - log_p).mean()
        else:
            terms["kl_co"] = torch.zeros((), device=k.device)
        terms["l2"] = self.l2_penalty()
        return terms

    def l2_penalty(self):
        """L2 on the recurrent weights, as TF LFADS and lfads-torch weigh it: the sum over the
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
