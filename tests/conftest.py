import os
import sys

import pytest

# the recurrent steps run eagerly in the tests: torch.compile's first call takes seconds in
# every process, and tests/test_scan.py checks the compiled steps against the eager ones
os.environ["LFADS_COMPILE"] = "0"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from src.synth import LorenzConfig, make_lorenz, write_session  # noqa: E402

# a Lorenz session small enough to train for a few steps in seconds
TINY = LorenzConfig(n_conditions=8, trials_per_condition=6, n_bins=20, n_fp_bins=4,
                    n_neurons=12, n_heldout=3, seed=1)

# a model small enough to be quick, with every part switched on
TINY_MODEL = ["--ic_enc_dim", "16", "--ci_enc_dim", "16", "--con_dim", "16", "--co_dim", "2",
              "--ic_dim", "8", "--gen_dim", "32", "--fac_dim", "8", "--batch_size", "16",
              "--n_samples", "3", "--kl_epochs", "5", "--l2_epochs", "5", "--threads", "1"]


@pytest.fixture
def tiny_h5(tmp_path):
    """Path of a tiny ground-truth session file in a fresh folder."""
    path = tmp_path / "data" / "tiny.h5"
    path.parent.mkdir()
    data, attrs = make_lorenz(TINY)
    write_session(str(path), data, attrs)
    return path


@pytest.fixture(scope="module")
def ibl_home(tmp_path_factory):
    """HOME in a temporary folder for the whole module (ONE writes under it); ONE's instance
    cache cleared before and after, since its instances point into the folder."""
    from one.api import ONE  # the IBL stack only for the tests that ask for it

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        ONE.cache_clear()
        yield home
        ONE.cache_clear()
