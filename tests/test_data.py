"""Every malformed session file is refused with an error that names the file and the key."""

import h5py
import numpy as np
import pytest

from src.data import DataError, find_session_files, load_session


def rewrite(path, **changes):
    """Copy of a session file with keys replaced (value) or removed (None)."""
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in f}
        attrs = dict(f.attrs)
    out = path.parent / "bad.h5"
    with h5py.File(out, "w") as f:
        for k, v in {**data, **changes}.items():
            if v is not None:
                f.create_dataset(k, data=v)
        for k, v in attrs.items():
            f.attrs[k] = v
    return out


def arr(path, key):
    with h5py.File(path, "r") as f:
        return f[key][()]


def test_the_example_file_loads(tiny_h5):
    s = load_session(str(tiny_h5))
    assert s.sizes == dict(n_in=9, n_out=12, t_enc=16, t_rec=20, ext_dim=0)
    assert len(s.train) + len(s.valid) == 48 and s.bin_size == 0.02
    assert s.valid.truth.shape == s.valid.recon.shape
    assert 0 < s.valid.truth.mean() < 2  # expected counts per bin, not Hz


def test_float_integer_counts_are_accepted(tiny_h5):
    keys = [f"{s}_{k}_data" for s in ("train", "valid") for k in ("encod", "recon")]
    floats = rewrite(tiny_h5, **{k: arr(tiny_h5, k).astype(np.float64) for k in keys})
    s = load_session(str(floats))
    for k in keys:  # the same counts as the file's integers
        split, what = k.split("_")[:2]
        np.testing.assert_array_equal(getattr(getattr(s, split), what).numpy(), arr(tiny_h5, k))


@pytest.mark.parametrize("key", ["train_encod_data", "valid_recon_data", "train_recon_data"])
def test_missing_key(tiny_h5, key):
    with pytest.raises(DataError, match=f"bad.h5: missing key '{key}'"):
        load_session(str(rewrite(tiny_h5, **{key: None})))


def bad_values(tiny_h5, key, fn):
    return rewrite(tiny_h5, **{key: fn(arr(tiny_h5, key))})


CASES = {
    "nan": (lambda a: np.where(a == 0, np.nan, a.astype(float)), "NaN or infinite"),
    "negative": (lambda a: a.astype(np.int32) - 1, "negative values"),
    "non-integer": (lambda a: a + 0.5, "non-integer values"),
    "rank": (lambda a: a[:, :, 0], r"expected \(trials, bins, neurons\)"),
    "strings": (lambda a: np.full(a.shape[:2] + (1,), b"x"), "dtype"),
    "empty": (lambda a: a[:0], "no trials"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_counts(tiny_h5, case):
    fn, message = CASES[case]
    with pytest.raises(DataError, match=f"bad.h5: 'valid_encod_data' .*{message}"):
        load_session(str(bad_values(tiny_h5, "valid_encod_data", fn)))


def test_mismatched_trial_counts(tiny_h5):
    bad = bad_values(tiny_h5, "train_recon_data", lambda a: a[:-1])
    with pytest.raises(DataError, match="'train_encod_data' has .* trials but 'train_recon_data'"):
        load_session(str(bad))


def test_fewer_recon_bins_than_encoder_bins(tiny_h5):
    bad = bad_values(tiny_h5, "train_recon_data", lambda a: a[:, :10])
    with pytest.raises(DataError, match="'train_recon_data' has 10 bins, fewer than the 16"):
        load_session(str(bad))


def test_fewer_recon_neurons_than_encoder_neurons(tiny_h5):
    bad = bad_values(tiny_h5, "valid_recon_data", lambda a: a[:, :, :5])
    with pytest.raises(DataError, match="'valid_recon_data' has 5 neurons, fewer than"):
        load_session(str(bad))


def test_splits_disagree_on_sizes(tiny_h5):
    # valid has 8 held-in neurons (its encoder input still the held-in block), train 9
    bad = rewrite(tiny_h5, valid_encod_data=arr(tiny_h5, "valid_encod_data")[:, :, :8],
                  valid_recon_data=np.delete(arr(tiny_h5, "valid_recon_data"), 8, axis=2),
                  valid_truth=None)
    with pytest.raises(DataError, match="'train_encod_data' has 9 neurons but 'valid_encod_data'"):
        load_session(str(bad))


def test_truth_of_the_wrong_shape(tiny_h5):
    bad = bad_values(tiny_h5, "valid_truth", lambda a: a[:, :, :4])
    with pytest.raises(DataError, match="'valid_truth' has shape"):
        load_session(str(bad))


def test_missing_bin_size(tiny_h5):
    bad = rewrite(tiny_h5)
    with h5py.File(bad, "a") as f:
        del f.attrs["bin_size"]
    with pytest.raises(DataError, match="bad.h5: missing attribute 'bin_size'"):
        load_session(str(bad))


def test_truncated_file(tiny_h5):
    raw = tiny_h5.read_bytes()
    cut = tiny_h5.parent / "cut.h5"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cut.h5"):
        load_session(str(cut))


def test_not_hdf5(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_text("hello")
    with pytest.raises(DataError, match="junk.h5: not a readable HDF5 file"):
        load_session(str(junk))


def test_empty_data_folder_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match="setup.sh.*prep_data"):
        find_session_files(None, None, str(tmp_path))


def test_unknown_insertion(tiny_h5):
    with pytest.raises(DataError, match="--ins abc: no file .*abc.h5.*prep_data --pids abc.*tiny"):
        find_session_files(None, "abc", str(tiny_h5.parent))


def test_file_choice(tiny_h5):
    folder = str(tiny_h5.parent)
    assert find_session_files(None, None, folder) == [str(tiny_h5)]
    assert find_session_files(None, "tiny", folder) == [str(tiny_h5)]
    assert find_session_files(str(tiny_h5), None, "elsewhere") == [str(tiny_h5)]
    with pytest.raises(DataError, match="--data nope.h5: no such file"):
        find_session_files("nope.h5", None, folder)


def test_a_session_file_that_moved(tmp_path):
    # what a resumed run meets when its data moved: the way out is named
    with pytest.raises(DataError, match="gone.h5: no such file .*--data"):
        load_session(str(tmp_path / "gone.h5"))


def test_no_held_in_neurons(tiny_h5):
    # every neuron held out (e.g. a preparation with --heldout-frac 1): nothing to encode
    bad = rewrite(tiny_h5, train_encod_data=arr(tiny_h5, "train_encod_data")[:, :, :0])
    with pytest.raises(DataError, match="'train_encod_data' has no neurons"):
        load_session(str(bad))
