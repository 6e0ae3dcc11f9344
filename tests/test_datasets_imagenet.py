"""ImageNet: a tiny ILSVRC folder of real JPEGs (Pillow) -> HDF5 shards -> loader."""
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinynorm.datasets import (BatchIterator, DataNotFoundError, ImageNetAugment, load_dataset,
                               prepare_imagenet, verify_imagenet)
from tinynorm.datasets import base, imagenet

WNIDS = ["n01440764", "n01443537", "n02085620"]  # sorted: class i = WNIDS[i]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
SCRIPT = Path(__file__).resolve().parents[1] / "data" / "prepare_imagenet.py"


def _image(rng, colour, size, mode):
    """A real JPEG-able image: a solid colour in the top half, noise below."""
    w, h = size
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pixels[: h // 2] = colour
    im = Image.fromarray(pixels, "RGB")
    return im.convert(mode)


def make_ilsvrc(root, val_layout="txt", seed=0):
    """train/<wnid>/*.JPEG (3 per class; RGB, greyscale, CMYK; several sizes) and val/."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (23, 61), (64, 64)]
    modes = ["RGB", "L", "CMYK"]
    for label, wnid in enumerate(WNIDS):
        d = root / "train" / wnid
        d.mkdir(parents=True)
        for k in range(3):
            _image(rng, COLOURS[label], sizes[k], modes[k]).save(
                d / f"{wnid}_{k}.JPEG", quality=95)
    val = root / "val"
    val.mkdir()
    val_labels = [2, 0, 1, 2]
    names = [f"ILSVRC2012_val_{i + 1:08d}" for i in range(len(val_labels))]
    for name, label in zip(names, val_labels):
        im = _image(rng, COLOURS[label], (50, 37), "RGB")
        if val_layout == "folders":
            (val / WNIDS[label]).mkdir(exist_ok=True)
            im.save(val / WNIDS[label] / f"{name}.JPEG")
        else:
            im.save(val / f"{name}.JPEG")
    if val_layout == "txt":
        # wnids, and one integer class index, as "filename label" lines
        lines = [f"{n}.JPEG {WNIDS[l] if i else l}" for i, (n, l) in enumerate(zip(names,
                                                                                    val_labels))]
        (root / "val_labels.txt").write_text("\n".join(lines) + "\n")
    elif val_layout == "loc_csv":
        rows = [f"{n},{WNIDS[l]} 1 2 30 20 {WNIDS[l]} 3 4 10 10" for n, l in zip(names,
                                                                                 val_labels)]
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n"
                                                   + "\n".join(rows) + "\n")
    (root / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
        "n02085620 Chihuahua\n")
    return val_labels


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    src, out = root / "ILSVRC", root / "out"
    val_labels = make_ilsvrc(src)
    summary = prepare_imagenet(src, out, shard_size=4, progress=False)
    return src, out, val_labels, summary


def copy_of(prepared, tmp_path):
    src, out, _, _ = prepared
    shutil.copytree(out, tmp_path / "out")
    return src, tmp_path / "out"


def test_prepare_writes_shards_index_and_counts(prepared):
    src, out, val_labels, summary = prepared
    assert summary["counts"] == {"train": 9, "val": 4}
    assert sorted(summary["written"]) == sorted(
        [f"train-{k:05d}-of-00003.h5" for k in range(3)] + ["val-00000-of-00001.h5"])
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == WNIDS and index["image_size"] == 256
    assert index["class_names"][2] == "Chihuahua"
    assert [s["count"] for s in index["splits"]["train"]["shards"]] == [4, 4, 1]
    assert not list(out.glob("*.tmp"))
    assert verify_imagenet(out) == {"train": 9, "val": 4}


def test_loader_reads_images_and_labels(prepared):
    src, out, val_labels, _ = prepared
    ds = load_dataset("imagenet", root=out)
    assert ds.name == "imagenet" and ds.num_classes == 3 and ds.class_names[0].startswith("tench")
    assert len(ds.train) == 9 and len(ds.test) == 4
    assert ds.train.image_shape == (3, 256, 256)
    np.testing.assert_array_equal(ds.train.labels, np.repeat([0, 1, 2], 3))
    np.testing.assert_array_equal(ds.test.labels, val_labels)
    # unordered, repeated indices across shards come back in the asked order
    idx = np.array([8, 0, 5, 0, 4, 7])
    images, labels = ds.train.get_batch(idx)
    assert images.shape == (6, 3, 256, 256) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, ds.train.labels[idx])
    files = sorted((src / "train").glob("*/*.JPEG"))
    for row, i in enumerate(idx):
        np.testing.assert_array_equal(images[row], imagenet.load_image(files[i], 256))
    np.testing.assert_array_equal(ds.train.images[[4, 7]], images[[4, 5]])
    # resized to the full square (aspect not kept): the solid top half covers rows 0..~127
    # greyscale (the 2nd file of each class) comes back as 3 equal channels of its luma
    for i in range(9):
        colour = np.array(COLOURS[i // 3], float)
        if i % 3 == 1:
            colour = np.full(3, colour @ [0.299, 0.587, 0.114])
        top = ds.train[i][0][:, 8:110, 8:248].reshape(3, -1).mean(axis=1)
        assert np.abs(top - colour).max() < 40, (i, top, colour)
    ds.train.close()


@pytest.mark.parametrize("layout", ["folders", "loc_csv"])
def test_val_layouts(tmp_path, layout):
    val_labels = make_ilsvrc(tmp_path / "src", val_layout=layout)
    prepare_imagenet(tmp_path / "src", tmp_path / "out", size=32, progress=False)
    ds = load_dataset("imagenet", root=tmp_path / "out")
    np.testing.assert_array_equal(ds.test.labels, val_labels)
    assert ds.test.image_shape == (3, 32, 32)


def test_resume_skips_complete_shards_and_redoes_the_rest(prepared, tmp_path, monkeypatch):
    src, out = copy_of(prepared, tmp_path)
    again = prepare_imagenet(src, out, shard_size=4, progress=False)
    assert again["written"] == [] and len(again["skipped"]) == 4
    (out / "train-00001-of-00003.h5").unlink()
    again = prepare_imagenet(src, out, shard_size=4, progress=False)
    assert again["written"] == ["train-00001-of-00003.h5"]
    # a crash in the middle of a shard leaves no partial shard behind
    fresh = tmp_path / "fresh"
    real_load, calls = imagenet.load_image, []

    def flaky(path, size):
        calls.append(path)
        if len(calls) == 6:
            raise KeyboardInterrupt("simulated crash")
        return real_load(path, size)

    monkeypatch.setattr(imagenet, "load_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_imagenet(src, fresh, shard_size=4, progress=False)
    assert sorted(p.name for p in fresh.glob("*.h5")) == ["train-00000-of-00003.h5"]
    assert not list(fresh.glob("*.tmp")) and not (fresh / "index.json").exists()
    monkeypatch.setattr(imagenet, "load_image", real_load)
    resumed = prepare_imagenet(src, fresh, shard_size=4, progress=False)
    assert resumed["skipped"] == ["train-00000-of-00003.h5"] and len(resumed["written"]) == 3
    a, b = load_dataset("imagenet", root=fresh), load_dataset("imagenet", root=out)
    np.testing.assert_array_equal(a.train.get_batch(np.arange(9))[0],
                                  b.train.get_batch(np.arange(9))[0])
    # a different image size is a different file list fingerprint: everything is redone
    assert len(prepare_imagenet(src, fresh, size=32, shard_size=4,
                                progress=False)["written"]) == 4


def test_truncated_shard_is_named(prepared, tmp_path):
    _, out = copy_of(prepared, tmp_path)
    shard = out / "train-00001-of-00003.h5"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ValueError, match="broken or unreadable HDF5") as info:
        load_dataset("imagenet", root=out)
    assert str(shard) in str(info.value)


def test_garbage_shard_is_named(prepared, tmp_path):
    _, out = copy_of(prepared, tmp_path)
    shard = out / "val-00000-of-00001.h5"
    shard.write_bytes(b"not an hdf5 file" * 100)
    with pytest.raises(ValueError, match="HDF5") as info:
        load_dataset("imagenet", root=out)
    assert str(shard) in str(info.value)


def test_checksum_and_missing_shard(prepared, tmp_path):
    _, out = copy_of(prepared, tmp_path)
    shard = out / "train-00002-of-00003.h5"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the last image's pixels: still a valid HDF5 file
    shard.write_bytes(bytes(data))
    assert len(load_dataset("imagenet", root=out).train) == 9  # counts still fine
    with pytest.raises(ValueError, match="sha256") as info:
        load_dataset("imagenet", root=out, verify=True)
    assert str(shard) in str(info.value)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="prepare_imagenet.py"):
        load_dataset("imagenet", root=out)


def test_label_out_of_range_in_shard(prepared, tmp_path):
    import h5py
    _, out = copy_of(prepared, tmp_path)
    shard = out / "val-00000-of-00001.h5"
    with h5py.File(shard, "r+") as f:
        f["labels"][1] = 3
    with pytest.raises(ValueError, match=r"outside \[0, 3\)") as info:
        load_dataset("imagenet", root=out)
    assert str(shard) in str(info.value)


def test_bad_sources(tmp_path):
    src = tmp_path / "src"
    make_ilsvrc(src)
    bad = src / "train" / WNIDS[1] / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="cannot decode image") as info:
        prepare_imagenet(src, tmp_path / "out", progress=False)
    assert str(bad) in str(info.value)
    bad.unlink()
    labels = src / "val_labels.txt"
    text = labels.read_text()
    labels.write_text(text.replace(WNIDS[2], "n99999999", 1))
    with pytest.raises(ValueError, match="n99999999"):
        prepare_imagenet(src, tmp_path / "out", progress=False)
    labels.write_text("\n".join(text.splitlines()[1:]))
    with pytest.raises(ValueError, match="no label for this image"):
        prepare_imagenet(src, tmp_path / "out", progress=False)
    labels.unlink()
    with pytest.raises(FileNotFoundError, match="--val-labels"):
        prepare_imagenet(src, tmp_path / "out", progress=False)


def test_missing_prepared_data_says_how(tmp_path, monkeypatch):
    monkeypatch.delenv(base.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(base, "_REPO_DATA", tmp_path / "repo-data")
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("imagenet")
    message = str(info.value)
    assert "prepare_imagenet.py" in message and str(tmp_path / "data" / "imagenet") in message


def _script():
    spec = importlib.util.spec_from_file_location("prepare_imagenet_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli(tmp_path, capsys):
    make_ilsvrc(tmp_path / "src", val_layout="folders")
    script = _script()
    argv = ["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--size", "48",
            "--shard-size", "5", "--no-progress", "--verify"]
    assert script.main(argv) == 0
    assert "9 training and 4 validation images; 3 shard(s) written" in capsys.readouterr().out
    assert load_dataset("imagenet", root=tmp_path / "out").train.image_shape == (3, 48, 48)
    assert script.main(argv) == 0
    assert "0 shard(s) written, 3 already complete" in capsys.readouterr().out
    assert script.main(["--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2"),
                        "--no-progress"]) == 1
    assert "no training folder" in capsys.readouterr().err


def test_batches_from_shards_with_imagenet_augment(prepared):
    _, out, _, _ = prepared
    ds = load_dataset("imagenet", root=out)
    train_aug = ImageNetAugment(crop=224, train=True)
    runs = [list(BatchIterator(ds.train, 4, train_aug, rng_seed=5, prefetch=p).epoch(1))
            for p in (True, False)]
    assert len(runs[0]) == 2
    for (xa, ya), (xb, yb) in zip(*runs):
        assert xa.shape == (4, 3, 224, 224) and xa.dtype == np.float32
        assert xa.min() >= -1 and xa.max() <= 1
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    x, y = next(iter(BatchIterator(ds.test, 4, ImageNetAugment(train=False), shuffle=False)))
    images, labels = ds.test.get_batch(np.arange(4))
    np.testing.assert_allclose(x, images[:, :, 16:240, 16:240] / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(y, labels)
