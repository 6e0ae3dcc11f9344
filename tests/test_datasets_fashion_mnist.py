"""Fashion-MNIST: IDX files written here byte by byte, the search order, bad input,
and Debian's real files when installed."""
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from tinynorm import datasets
from tinynorm.datasets import base, fashion_mnist
from tinynorm.datasets import DataNotFoundError, load_dataset, read_idx

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array, type_code=0x08):
    """The IDX encoding, written from the format's description (not the library's code)."""
    header = struct.pack(">HBB", 0, type_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(directory, n_train=12, n_test=7, compress=True, seed=0, overrides=None):
    """Write the four files; ``overrides`` maps a file stem to raw bytes to write instead."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for stem, array in arrays.items():
        raw = (overrides or {}).get(stem, idx_bytes(array))
        if compress:
            (directory / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)
    return arrays


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $TINYNORM_DATA, an empty ./data, the repo's data/ and Debian's path moved to tmp."""
    monkeypatch.delenv(base.ENV_VAR, raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(base, "_REPO_DATA", tmp_path / "repo-data")
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "debian" / "fashion-mnist")
    return tmp_path


@pytest.mark.parametrize("compress", [True, False])
def test_loads_generated_idx_files(tmp_path, compress):
    arrays = write_fashion(tmp_path, compress=compress)
    ds = load_dataset("fashion-mnist", root=tmp_path)
    assert ds.name == "fashion-mnist" and ds.num_classes == 10
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert ds.train.images.shape == (12, 1, 28, 28) and ds.train.images.dtype == np.uint8
    assert ds.test.images.shape == (7, 1, 28, 28)
    assert ds.train.labels.dtype == np.int64 and ds.train.labels.shape == (12,)
    np.testing.assert_array_equal(ds.train.images[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test.labels, arrays["t10k-labels-idx1-ubyte"])


def test_read_idx_shapes(tmp_path):
    path = tmp_path / "x"
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path.write_bytes(idx_bytes(a))
    np.testing.assert_array_equal(read_idx(path), a)
    with pytest.raises(ValueError, match="3 dimension"):
        read_idx(path, expect_ndim=1)


def test_search_order_env_then_data_then_debian(isolated, monkeypatch):
    debian = fashion_mnist.DEBIAN_DIR
    write_fashion(debian, seed=1)
    assert load_dataset("fashion-mnist").source == str(debian)
    write_fashion(isolated / "repo-data" / "fashion-mnist", seed=2)
    assert load_dataset("fashion-mnist").source == str(isolated / "repo-data" / "fashion-mnist")
    write_fashion(Path("data"), seed=3)  # ./data itself
    assert Path(load_dataset("fashion-mnist").source).resolve() == (isolated / "cwd" / "data")
    env_root = isolated / "env"
    write_fashion(env_root / "fashion-mnist", seed=4)
    monkeypatch.setenv(base.ENV_VAR, str(env_root))
    ds = load_dataset("fashion-mnist")
    assert ds.source == str(env_root / "fashion-mnist")
    expected = write_fashion(isolated / "check", seed=4)["train-images-idx3-ubyte"]
    np.testing.assert_array_equal(ds.train.images[:, 0], expected)
    # an explicit root wins over everything
    arg = isolated / "arg"
    write_fashion(arg, seed=5)
    assert load_dataset("fashion-mnist", root=arg).source == str(arg)


def test_missing_everywhere_lists_paths_and_how_to_get(isolated, monkeypatch):
    monkeypatch.setenv(base.ENV_VAR, str(isolated / "env"))
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("fashion-mnist")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in message
    order = [str(isolated / "env" / "fashion-mnist"), str(isolated / "cwd" / "data"),
             str(isolated / "repo-data"), str(fashion_mnist.DEBIAN_DIR)]
    positions = [message.index(p) for p in order]
    assert positions == sorted(positions)


def test_explicit_root_does_not_fall_back(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataNotFoundError, match="root argument") as info:
        load_dataset("fashion-mnist", root=empty)
    searched = [line.strip() for line in str(info.value).splitlines() if line.startswith("  ")]
    assert searched == [f"{empty / 'fashion-mnist'}  (root argument)",
                        f"{empty / 'fashion_mnist'}  (root argument)",
                        f"{empty}  (root argument)"]


def test_partial_directory_names_missing_file(tmp_path):
    write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", root=tmp_path)


def _good(n, shape=(28, 28)):
    return idx_bytes(np.zeros((n,) + shape, np.uint8))


@pytest.mark.parametrize("stem, raw, match", [
    ("train-images-idx3-ubyte", b"\x00\x00\x08\x05" + b"\x00" * 40, "bad IDX magic|dimension"),
    ("train-images-idx3-ubyte", b"\x12\x34\x08\x03" + b"\x00" * 40, "bad IDX magic"),
    ("train-labels-idx1-ubyte", b"\x00\x00\x0d\x01" + struct.pack(">I", 12) + b"\0" * 48,
     "bad IDX magic"),
    ("train-images-idx3-ubyte", _good(12)[:-100], "short read"),
    ("train-images-idx3-ubyte", _good(12) + b"\x00", "trailing bytes"),
    ("train-labels-idx1-ubyte", b"\x00\x00", "too short"),
    ("train-images-idx3-ubyte", _good(12, (28, 27)), "28x28"),
    ("train-labels-idx1-ubyte", idx_bytes(np.zeros(11, np.uint8)), "12 images but .* 11 labels"),
    ("train-labels-idx1-ubyte", idx_bytes(np.array([0] * 11 + [10], np.uint8)),
     r"outside \[0, 10\)"),
])
def test_bad_files_name_the_file(tmp_path, stem, raw, match):
    write_fashion(tmp_path, overrides={stem: raw})
    with pytest.raises(ValueError, match=match) as info:
        load_dataset("fashion-mnist", root=tmp_path)
    assert stem in str(info.value)


def test_truncated_gzip_names_the_file(tmp_path):
    write_fashion(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt or truncated gzip") as info:
        load_dataset("fashion-mnist", root=tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_known_sizes():
    ds = datasets.load_fashion_mnist(DEBIAN)
    assert ds.train.images.shape == (60000, 1, 28, 28)
    assert ds.test.images.shape == (10000, 1, 28, 28)
    # the set is balanced: 6000 and 1000 images per class
    np.testing.assert_array_equal(np.bincount(ds.train.labels, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test.labels, minlength=10), [1000] * 10)
    assert 0 < ds.train.images.mean() < 255
