"""CIFAR-10: the official python-version batches and tarball, generated here."""
import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest

from tinynorm.datasets import DataNotFoundError, load_dataset
from tinynorm.datasets.cifar10 import CLASS_NAMES, read_cifar_batch

PER_BATCH = 6
NAMES = [f"class-{i}" for i in range(10)]


def py2_dumps(obj):
    """A protocol-2 pickle as Python 2's cPickle wrote the CIFAR files.

    Python 2 strings are BINSTRING opcodes (bytes when read with
    encoding="bytes"), and NumPy arrays go through numpy.core.multiarray.
    Handles bytes, int, list, dict and 2-d uint8 arrays.
    """
    def string(b):
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))) + b

    def integer(v):
        return b"J" + struct.pack("<i", v)

    def encode(o):
        if isinstance(o, bytes):
            return string(o)
        if isinstance(o, (int, np.integer)):
            return integer(int(o))
        if isinstance(o, list):
            return b"](" + b"".join(encode(v) for v in o) + b"e"
        if isinstance(o, dict):
            return b"}(" + b"".join(encode(k) + encode(v) for k, v in o.items()) + b"u"
        if isinstance(o, np.ndarray) and o.dtype == np.uint8 and o.ndim == 2:
            dtype = (b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R(K\x03" + string(b"|")
                     + b"NNN" + integer(-1) + integer(-1) + b"K\x00tb")
            return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
                    + string(b"b") + b"\x87R(K\x01" + integer(o.shape[0]) + integer(o.shape[1])
                    + b"\x86" + dtype + b"\x89" + string(o.tobytes()) + b"tb")
        raise TypeError(type(o))

    return b"\x80\x02" + encode(obj) + b"."


def batch_dict(images, labels, name):
    """A batch as the official pickles hold it: bytes keys, (n, 3072) uint8, a list of labels."""
    return {b"batch_label": name.encode(), b"labels": [int(v) for v in labels],
            b"data": images.reshape(len(images), 3072),
            b"filenames": [f"img_{i}.png".encode() for i in range(len(images))]}


def cifar_files(seed=0, labels_override=None):
    """{member name: pickle bytes} for the 7 files, and the arrays they hold."""
    rng = np.random.default_rng(seed)
    files, arrays = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (PER_BATCH, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, PER_BATCH)
        if labels_override and name in labels_override:
            labels = labels_override[name]
        arrays[name] = (images, labels)
        files[name] = py2_dumps(batch_dict(images, labels, name))
    files["batches.meta"] = py2_dumps(
        {b"label_names": [n.encode() for n in NAMES], b"num_cases_per_batch": PER_BATCH,
         b"num_vis": 3072})
    return files, arrays


def write_folder(directory, files):
    folder = directory / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def write_tarball(directory, files):
    path = directory / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def check_contents(ds, arrays):
    train_images = np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = np.concatenate([arrays[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert ds.name == "cifar10" and ds.num_classes == 10 and ds.class_names == NAMES
    assert ds.train.images.shape == (5 * PER_BATCH, 3, 32, 32)
    assert ds.train.images.dtype == np.uint8 and ds.train.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.train.images, train_images)
    np.testing.assert_array_equal(ds.train.labels, train_labels)
    np.testing.assert_array_equal(ds.test.images, arrays["test_batch"][0])
    np.testing.assert_array_equal(ds.test.labels, arrays["test_batch"][1])


def test_folder(tmp_path):
    files, arrays = cifar_files()
    write_folder(tmp_path, files)
    check_contents(load_dataset("cifar10", root=tmp_path), arrays)


def test_tarball_in_root_and_as_root(tmp_path):
    files, arrays = cifar_files(seed=1)
    path = write_tarball(tmp_path, files)
    check_contents(load_dataset("cifar10", root=tmp_path), arrays)
    check_contents(load_dataset("cifar-10", root=path), arrays)


def test_python3_pickles_also_load(tmp_path):
    # a batch re-pickled by Python 3 (bytes via _codecs.encode) reads the same
    images = np.random.default_rng(3).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    data = pickle.dumps(batch_dict(images, [1, 2, 3, 9], "x"), protocol=2)
    got, labels = read_cifar_batch(data, "x")
    np.testing.assert_array_equal(got, images)
    assert labels.tolist() == [1, 2, 3, 9]
    assert got.shape == read_cifar_batch(py2_dumps(batch_dict(images, [0] * 4, "x")), "y")[0].shape


def test_row_layout_is_channel_major():
    # the official row: 1024 red values, then 1024 green, then 1024 blue, each row-major
    row = np.zeros((1, 3072), np.uint8)
    row[0, 0] = 1            # red (0, 0)
    row[0, 1024 + 33] = 2    # green, row 1, column 1
    row[0, 2048 + 1023] = 3  # blue (31, 31)
    data = pickle.dumps({b"data": row, b"labels": [4]}, protocol=2)
    images, labels = read_cifar_batch(data, "x")
    assert images.shape == (1, 3, 32, 32) and labels.tolist() == [4]
    assert images[0, 0, 0, 0] == 1 and images[0, 1, 1, 1] == 2 and images[0, 2, 31, 31] == 3
    assert images.sum() == 6


def test_meta_optional_uses_builtin_names(tmp_path):
    files, _ = cifar_files()
    del files["batches.meta"]
    write_folder(tmp_path, files)
    assert load_dataset("cifar10", root=tmp_path).class_names == CLASS_NAMES


def test_missing_batch_is_named(tmp_path):
    files, _ = cifar_files()
    del files["data_batch_3"]
    write_folder(tmp_path, files)
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", root=tmp_path)


def test_not_found_lists_paths(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar10", root=tmp_path)
    message = str(info.value)
    assert "cifar-10-python.tar.gz" in message
    assert str(tmp_path / "cifar10" / "cifar-10-batches-py") in message


@pytest.mark.parametrize("name, data, match", [
    ("data_batch_2", b"\x80\x02}q\x00(U\x04data", "not a readable CIFAR-10 pickle"),
    ("test_batch", b"garbage", "not a readable CIFAR-10 pickle"),
    ("data_batch_1", pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2),
     "without 'data' and 'labels'"),
    ("data_batch_1", pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]},
                                  protocol=2), r"\(n, 3072\)"),
    ("data_batch_4", pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]},
                                  protocol=2), "2 images but"),
    ("data_batch_5", pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
                                  protocol=2), r"outside \[0, 10\)"),
    ("test_batch", pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [-1, 0]},
                                protocol=2), r"outside \[0, 10\)"),
    ("data_batch_1", pickle.dumps(os.getcwd, protocol=2), "refusing to load global"),
], ids=["truncated", "garbage", "no-labels", "wrong-width", "count-mismatch", "label-10",
        "label-minus-1", "code-global"])
def test_bad_batches_name_the_file(tmp_path, name, data, match):
    files, _ = cifar_files()
    files[name] = data
    folder = write_folder(tmp_path, files)
    with pytest.raises(ValueError, match=match) as info:
        load_dataset("cifar10", root=tmp_path)
    assert str(folder / name) in str(info.value)


def test_truncated_tarball(tmp_path):
    files, _ = cifar_files()
    path = write_tarball(tmp_path, files)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError) as info:
        load_dataset("cifar10", root=tmp_path)
    assert str(path) in str(info.value)


def test_bad_label_inside_tarball_names_member(tmp_path):
    files, _ = cifar_files(labels_override={"data_batch_2": np.array([0, 1, 2, 3, 4, 11])})
    path = write_tarball(tmp_path, files)
    with pytest.raises(ValueError, match="outside") as info:
        load_dataset("cifar10", root=tmp_path)
    assert f"{path}:cifar-10-batches-py/data_batch_2" in str(info.value)
