"""The Neural Latents Benchmark's smoothing baseline, beside every run: what LFADS's co-bps has to
beat on the same trials.

The baseline (NLB'21, Pei et al. 2021; nlb_tools' examples/baselines/smoothing) smooths each
trial's held-in spikes with a Gaussian kernel, takes log(smoothed + 1e-4) as the input of one
Poisson GLM per held-out neuron, fits the GLMs on the training trials and predicts the held-out
neurons' rates of the evaluated trials. Its held-in rates are the smoothed spikes themselves.
It predicts nothing past the bins it reads, so it has no forward-prediction score.

src.main scores it after training on the run's own training and validation trials
(`valid_co_bps_smoothing` in summary.json); src/nlb.py uses it for NLB's own submission format.

Legend: K trials, T bins, N_in held-in neurons, N_out held-out neurons.
"""

import h5py
import numpy as np

from src.metrics import bits_per_spike

# NLB's settings where a session file does not carry its dataset's own (src/nlb.py writes
# them): MC_Maze's kernel SD and GLM penalty from the smoothing baseline's run_smoothing.py
KERN_SD_S, ALPHA = 0.05, 0.01
LOG_OFFSET = 1e-4  # added before the log, as the baseline does (no log 0)
MAX_ITER = 500  # the GLM's solver iterations, multiplied by 5 while it stops unconverged
MAX_ITER_CAP = 10_000  # the baseline's ceiling on that escalation


def kernel(kern_sd_s: float, bin_size: float) -> np.ndarray:
    """The baseline's Gaussian kernel, (M,) summing to 1: M = int(6 SD / bin) points with SD
    int(SD / bin) bins (both truncated to whole numbers, as the baseline's script does)."""
    from scipy.signal.windows import gaussian

    sd = max(int(kern_sd_s / bin_size + 1e-9), 1)  # a SD under one bin would be 0: no kernel
    w = gaussian(max(int(6 * kern_sd_s / bin_size + 1e-9), 1), sd, sym=True)
    return w / w.sum()


def smooth(counts: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(K, T, N) counts convolved over time with w, numpy's 'same' (zeros outside the trial):
    out[t] = sum_j x[j] w[t + (M - 1) // 2 - j]."""
    from scipy.signal import oaconvolve

    x = np.asarray(counts, np.float64)
    full = oaconvolve(x, w[None, :, None], mode="full", axes=1)  # (K, T + M - 1, N)
    c = (len(w) - 1) // 2
    return np.clip(full[:, c:c + x.shape[1]], 0, None)  # FFT rounding can dip below 0


def fit_glm(x: np.ndarray, y: np.ndarray, alpha: float):
    """A Poisson GLM of counts y (samples,) on inputs x (samples, N_in); refit with 5 times the
    iterations while it stops unconverged, as the baseline does. The baseline's model and
    penalty, solved by Newton steps instead of its L-BFGS: the same optimum, reached in a few
    steps where L-BFGS takes hundreds (2 to 3 times faster with 225 held-in neurons)."""
    from sklearn.linear_model import PoissonRegressor

    it = MAX_ITER
    while True:
        glm = PoissonRegressor(alpha=alpha, max_iter=it, solver="newton-cholesky").fit(x, y)
        if glm.n_iter_ < it or it >= MAX_ITER_CAP:
            return glm
        it *= 5


def glm_inputs(heldin: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(K, T, N_in) counts -> (K * T, N_in) log smoothed counts, the GLMs' inputs; float32
    halves the solver's time and moves its coefficients by about 1e-7."""
    return np.log(smooth(heldin, w).reshape(-1, heldin.shape[2]) + LOG_OFFSET).astype(np.float32)


def smoothing_rates(train_in, train_out, evals: list, bin_size: float,
                    kern_sd_s: float = KERN_SD_S, alpha: float = ALPHA) -> list:
    """Fit on the training trials' held-in (K, T, N_in) and held-out (K, T, N_out) counts;
    return, for each (K_e, T, N_in) held-in array of `evals`, its (held-in, held-out) rates in
    expected counts per bin. A neuron silent on every training bin is predicted at the
    smallest rate (no GLM can fit log 0)."""
    from threadpoolctl import threadpool_limits

    w = kernel(kern_sd_s, bin_size)
    x = glm_inputs(train_in, w)
    y = np.asarray(train_out, np.float32).reshape(-1, train_out.shape[2])  # (K * T, N_out)
    xs = [glm_inputs(e, w) for e in evals]
    preds = [np.empty((len(xe), y.shape[1])) for xe in xs]
    with threadpool_limits(1):  # many small fits: one thread each is fastest on a shared box
        for j in range(y.shape[1]):
            glm = fit_glm(x, y[:, j], alpha) if y[:, j].any() else None
            for p, xe in zip(preds, xs):
                p[:, j] = glm.predict(xe) if glm is not None else 0.0
    return [(smooth(e, w), np.clip(p, 1e-9, 1e20).reshape(e.shape[:2] + (-1,)))
            for e, p in zip(evals, preds)]


def settings(path: str) -> tuple:
    """(kernel SD in seconds, GLM penalty): the session file's own (an NLB dataset's), else
    the defaults."""
    with h5py.File(path, "r") as f:
        a = f.attrs
        return float(a.get("smoothing_kern_sd", KERN_SD_S)), float(a.get("smoothing_alpha", ALPHA))


def session_scores(session) -> dict:
    """{"co_bps_smoothing": ...} of a src.data.Session: the baseline fit on its training
    trials and scored on its validation trials, over the encoder bins; {} without held-out
    neurons."""
    t_enc, n_in = session.train.encod.shape[1:]
    if session.train.recon.shape[2] == n_in:
        return {}
    train = session.train.recon.numpy()[:, :t_enc]  # (K, T_enc, N)
    valid = session.valid.recon.numpy()[:, :t_enc]
    kern_sd, alpha = settings(session.path)
    [(_, rates)] = smoothing_rates(train[..., :n_in], train[..., n_in:], [valid[..., :n_in]],
                                   session.bin_size, kern_sd, alpha)
    return {"co_bps_smoothing": float(bits_per_spike(rates, valid[..., n_in:]))}
