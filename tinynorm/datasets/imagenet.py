"""ImageNet (ILSVRC-2012 layout) -> HDF5 shards of 256x256 images, and their reader.

Preparation (``prepare_imagenet``, the engine of ``data/prepare_imagenet.py``)
reads the usual layout

    SRC/train/<wnid>/*.JPEG                one folder per class
    SRC/val/<wnid>/*.JPEG                  class folders, or
    SRC/val/*.JPEG + a labels file         "filename label" lines (label: wnid
                                           or class index) or Kaggle's
                                           LOC_val_solution.csv

and writes, in OUT/,

    train-00000-of-00257.h5 ...            images uint8 (n, 3, S, S), labels int64 (n,)
    val-00000-of-00010.h5 ...
    index.json                             classes, counts, shard list with sha256

Classes are the sorted training folder names (wnids), so class ``i`` is the
``i``-th wnid in sorted order -- the usual ILSVRC index.  Every image is
decoded with Pillow, converted to RGB (ImageNet holds some greyscale and CMYK
JPEGs) and resized to S x S (S = 256) *without* keeping the aspect ratio: the
paper "rescaled [training images] to the size of 256x256 pixels".  Resampling
is bilinear with Pillow's antialiasing.

Resumable: the file list is sorted and cut into shards of ``shard_size``
images; each shard is written to a temporary file and moved into place with
``os.replace``, so a shard file that exists is complete.  A shard records a
fingerprint of its file list, labels and image size; a rerun skips shards
whose fingerprint matches and redoes the rest.  At the end every shard is
reopened and its count checked against the file list (``verify_imagenet``
also recomputes the sha256 of every shard).

Size: 256*256*3 bytes per image, about 252 GB for the 1.28M training images
uncompressed (``compression="lzf"`` trades CPU time for some of that).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .base import Dataset, Split, check_labels, not_found_error, search_dirs

__all__ = [
    "INDEX_FILE", "FORMAT", "IMAGE_EXTENSIONS", "H5Split", "find_imagenet",
    "load_imagenet", "prepare_imagenet", "verify_imagenet", "list_train",
    "list_val", "read_val_labels", "load_image",
]

INDEX_FILE = "index.json"
FORMAT = "tinynorm-imagenet-h5"
FORMAT_VERSION = 1
IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png"}
HOW_TO_GET = (
    "ImageNet cannot be downloaded automatically: get ILSVRC-2012 (CLS-LOC) from "
    "image-net.org (or Kaggle's imagenet-object-localization-challenge), then run\n"
    "  python data/prepare_imagenet.py --src /path/to/ILSVRC2012 --out data/imagenet\n"
    "which writes the HDF5 shards and index.json tinynorm reads.")


def _h5py():
    import h5py  # imported lazily: only ImageNet needs it
    return h5py


@contextmanager
def _naming_errors(path):
    """Turn h5py's OSError/KeyError on a damaged file into a ValueError naming the file."""
    try:
        yield
    except (OSError, KeyError, RuntimeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: broken or unreadable HDF5 shard "
                         f"({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------
# reading


class H5Split(Split):
    """One split of a prepared ImageNet, read lazily from its HDF5 shards.

    ``len(split)`` images in total; ``split.get_batch(indices)`` reads
    ``images`` uint8 (B, 3, S, S) and ``labels`` int64 (B,) in the order of
    ``indices``, whatever shards they come from.  All labels are held in
    memory (``split.labels``, int64 (N,)); images are read on demand.  At most
    ``max_open`` shard files are kept open (least recently used closed first).
    Safe to use from a ``BatchIterator``'s prefetch thread.
    """

    def __init__(self, paths, counts, num_classes, name="", max_open=32):
        h5py = _h5py()
        self.paths = [Path(p) for p in paths]
        self.num_classes = int(num_classes)
        self.name = name
        self.max_open = int(max_open)
        self._lock = threading.RLock()
        self._open = OrderedDict()
        labels, image_shape = [], None
        for path, count in zip(self.paths, counts):
            with _naming_errors(path):
                with h5py.File(path, "r") as f:
                    images_ds, labels_ds = _shard_datasets(f, path)
                    if images_ds.shape[0] != count or labels_ds.shape != (count,):
                        raise ValueError(f"{path}: holds {images_ds.shape[0]} images and "
                                         f"{labels_ds.shape[0]} labels, index.json says {count}")
                    if image_shape is None:
                        image_shape = tuple(images_ds.shape[1:])
                    elif tuple(images_ds.shape[1:]) != image_shape:
                        raise ValueError(f"{path}: images are {images_ds.shape[1:]}, "
                                         f"other shards {image_shape}")
                    shard_labels = labels_ds[...].astype(np.int64)
            check_labels(shard_labels, self.num_classes, str(path))
            labels.append(shard_labels)
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self.image_shape = image_shape or (3, 0, 0)
        counts = np.asarray([len(l) for l in labels], dtype=np.int64)
        # offsets[k] = index of the first image of shard k; offsets[-1] = N
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self):
        return len(self.labels)

    def _file(self, shard):
        f = self._open.get(shard)
        if f is not None:
            self._open.move_to_end(shard)
            return f
        path = self.paths[shard]
        with _naming_errors(path):
            f = _h5py().File(path, "r")
        self._open[shard] = f
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return f

    def _get(self, indices):
        images = np.empty((len(indices),) + self.image_shape, dtype=np.uint8)
        # which shard each requested image lives in
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        with self._lock:
            for shard in np.unique(shard_of):
                where = np.flatnonzero(shard_of == shard)
                local = indices[where] - self.offsets[shard]
                # h5py reads increasing, unique indices; map back afterwards
                unique_local, inverse = np.unique(local, return_inverse=True)
                with _naming_errors(self.paths[shard]):
                    block = self._file(int(shard))["images"][unique_local]
                images[where] = block[inverse]
        return images, self.labels[indices]

    def close(self):
        with self._lock:
            while self._open:
                self._open.popitem()[1].close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def images(self):
        """A lazy view: ``split.images[idx]`` reads uint8 (B, 3, S, S) images."""
        return _LazyImages(self)


class _LazyImages:
    def __init__(self, split):
        self._split = split
        self.shape = (len(split),) + split.image_shape
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            return self._split[idx][0]
        return self._split.get_batch(idx)[0]


def _shard_datasets(f, path):
    if "images" not in f or "labels" not in f:
        raise ValueError(f"{path}: HDF5 shard without 'images' and 'labels' datasets")
    images_ds, labels_ds = f["images"], f["labels"]
    if images_ds.dtype != np.uint8 or images_ds.ndim != 4 or images_ds.shape[1] != 3:
        raise ValueError(f"{path}: 'images' must be uint8 (n, 3, S, S), got "
                         f"{images_ds.dtype} {images_ds.shape}")
    return images_ds, labels_ds


def _read_index(path: Path):
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable index ({e})") from None
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: not a tinynorm ImageNet index (format={index.get('format')!r})")
    return index


def find_imagenet(root=None):
    """The directory holding ``index.json`` and the shards.

    Searched in order: ``root`` (only it, when given); ``$TINYNORM_DATA``;
    ``./data``; the source checkout's ``data/`` -- each directly and in an
    ``imagenet/`` subfolder.
    """
    searched = search_dirs(root, ["imagenet"])
    for directory, _ in searched:
        if (directory / INDEX_FILE).is_file():
            return directory
    raise not_found_error(f"Prepared ImageNet ({INDEX_FILE} and HDF5 shards)", searched,
                          HOW_TO_GET)


def load_imagenet(root=None, verify=False) -> Dataset:
    """A prepared ImageNet: lazy ``H5Split`` train and test (= ILSVRC val) splits.

    Every shard listed in ``index.json`` must exist and hold the count the
    index gives (checked on load, cheap); ``verify=True`` also recomputes
    each shard's sha256.  Images are uint8 (3, 256, 256), labels int64 in
    [0, num_classes).
    """
    directory = find_imagenet(root)
    index = _read_index(directory / INDEX_FILE)
    if verify:
        verify_imagenet(directory, checksums=True)
    num_classes = len(index["classes"])
    splits = {}
    for split_name in ("train", "val"):
        info = index["splits"].get(split_name)
        if info is None:
            raise ValueError(f"{directory / INDEX_FILE}: no '{split_name}' split")
        paths = [directory / s["file"] for s in info["shards"]]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"{p}: shard listed in {directory / INDEX_FILE} is "
                                        "missing; rerun data/prepare_imagenet.py to resume")
        counts = [s["count"] for s in info["shards"]]
        splits[split_name] = H5Split(paths, counts, num_classes, name=f"imagenet/{split_name}")
        if len(splits[split_name]) != info["count"]:
            raise ValueError(f"{directory / INDEX_FILE}: '{split_name}' count {info['count']} "
                             f"but the shards hold {len(splits[split_name])}")
    names = index.get("class_names") or None
    return Dataset("imagenet", splits["train"], splits["val"], num_classes, names,
                   source=str(directory), info={"classes": index["classes"],
                                                "image_size": index["image_size"]})


# ----------------------------------------------------------------------------
# preparing


def _images_in(directory: Path):
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_train(train_dir, max_per_class=None):
    """Training files and labels from ``train/<wnid>/*.JPEG``.

    Returns
    -------
    classes : sorted list of wnids (class i = classes[i])
    items : list of (Path, int label), sorted by class then file name
    """
    train_dir = Path(train_dir)
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{train_dir}: no training folder (expected train/<wnid>/*.JPEG)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{train_dir}: no class folders (expected train/<wnid>/*.JPEG)")
    items = []
    for label, wnid in enumerate(classes):
        files = _images_in(train_dir / wnid)
        if not files:
            raise ValueError(f"{train_dir / wnid}: class folder without images")
        items += [(p, label) for p in files[:max_per_class]]
    return classes, items


def read_val_labels(path, classes):
    """Validation labels from a file: ``{file stem: label}``.

    Formats:
      * plain text, one "filename label" per line (whitespace or comma
        separated), label a wnid or an integer class index;
      * Kaggle's ``LOC_val_solution.csv`` ("ImageId,PredictionString" with
        the wnid first in PredictionString).
    The devkit's ``ILSVRC2012_validation_ground_truth.txt`` (ILSVRC ids in
    the devkit's own order, one per line, no file names) is not supported.
    """
    path = Path(path)
    wnid_to_label = {w: i for i, w in enumerate(classes)}
    labels = {}

    def label_of(token, where):
        if token in wnid_to_label:
            return wnid_to_label[token]
        try:
            value = int(token)
        except ValueError:
            raise ValueError(f"{where}: label {token!r} is neither a training wnid nor "
                             "an integer") from None
        if not 0 <= value < len(classes):
            raise ValueError(f"{where}: label {value} outside [0, {len(classes)})")
        return value

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the validation labels ({e})") from None
    lines = text.splitlines()
    if lines and lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        for lineno, row in enumerate(csv.reader(lines[1:]), start=2):
            if not row:
                continue
            if len(row) < 2 or not row[1].split():
                raise ValueError(f"{path}:{lineno}: expected 'ImageId,PredictionString'")
            labels[Path(row[0]).stem] = label_of(row[1].split()[0], f"{path}:{lineno}")
        return labels
    for lineno, line in enumerate(lines, start=1):
        fields = line.replace(",", " ").split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'filename label', got {line!r}")
        labels[Path(fields[0]).stem] = label_of(fields[1], f"{path}:{lineno}")
    return labels


def list_val(val_dir, classes, labels_file=None):
    """Validation files and labels: class folders, or a flat folder plus a labels file.

    With a flat folder and no ``labels_file``, ``LOC_val_solution.csv`` or
    ``val_labels.txt`` next to ``val/`` (or inside it) is used when present.

    Returns
    -------
    items : list of (Path, int label), sorted by file name
    """
    val_dir = Path(val_dir)
    if not val_dir.is_dir():
        raise FileNotFoundError(f"{val_dir}: no validation folder")
    wnid_to_label = {w: i for i, w in enumerate(classes)}
    subdirs = sorted(p for p in val_dir.iterdir() if p.is_dir())
    if subdirs and labels_file is None:
        items = []
        for d in subdirs:
            if d.name not in wnid_to_label:
                raise ValueError(f"{d}: validation class folder {d.name!r} is not a training class")
            items += [(p, wnid_to_label[d.name]) for p in _images_in(d)]
        # file-name order, the same whatever the layout (ILSVRC2012_val_00000001 first)
        return sorted(items, key=lambda item: item[0].name)
    if labels_file is None:
        for candidate in (val_dir.parent / "LOC_val_solution.csv", val_dir / "LOC_val_solution.csv",
                          val_dir.parent / "val_labels.txt", val_dir / "val_labels.txt"):
            if candidate.is_file():
                labels_file = candidate
                break
        else:
            raise FileNotFoundError(
                f"{val_dir}: flat validation folder and no labels file; pass --val-labels "
                "(a 'filename label' text file or LOC_val_solution.csv) or sort val/ into "
                "class folders")
    labels = read_val_labels(labels_file, classes)
    items = []
    for p in _images_in(val_dir):
        if p.stem not in labels:
            raise ValueError(f"{p}: no label for this image in {labels_file}")
        items.append((p, labels[p.stem]))
    return items


def read_synsets(path):
    """``{wnid: name}`` from ``LOC_synset_mapping.txt`` / ``synset_words.txt`` ("wnid name, ...")."""
    names = {}
    for line in Path(path).read_text().splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            names[wnid] = name.strip()
    return names


def load_image(path, size):
    """uint8 (3, size, size): a file decoded, converted to RGB, resized (no aspect kept)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            # (H, W, 3) -> (3, H, W)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def _fingerprint(items, root, size):
    """sha256 of a shard's file list (relative to ``root``), labels and image size."""
    h = hashlib.sha256(f"size={size}\n".encode())
    for path, label in items:
        h.update(f"{Path(path).relative_to(root).as_posix()}\t{label}\n".encode())
    return h.hexdigest()


def _sha256_file(path, block=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _shard_complete(path, fingerprint, count):
    """True when ``path`` is a finished shard of this file list (else it is rewritten)."""
    if not path.is_file():
        return False
    try:
        with _h5py().File(path, "r") as f:
            return (f.attrs.get("fingerprint") == fingerprint
                    and f["images"].shape[0] == count and f["labels"].shape == (count,))
    except (OSError, KeyError):
        return False


def _write_shard(path, items, size, fingerprint, split, decode, compression, progress):
    """Decode ``items`` into a temporary HDF5 file, then move it to ``path``."""
    h5py = _h5py()
    tmp = path.with_name(path.name + ".tmp")
    n = len(items)
    try:
        with h5py.File(tmp, "w") as f:
            images = f.create_dataset("images", shape=(n, 3, size, size), dtype=np.uint8,
                                      chunks=(1, 3, size, size), compression=compression)
            f.create_dataset("labels", data=np.asarray([l for _, l in items], dtype=np.int64))
            for i, image in enumerate(decode(p for p, _ in items)):
                images[i] = image
                progress(1)
            f.attrs["fingerprint"] = fingerprint
            f.attrs["split"] = split
            f.attrs["count"] = n
            f.attrs["image_size"] = size
        digest = _sha256_file(tmp)  # still in the page cache: cheap to hash now
        os.replace(tmp, path)
        _write_text_atomic(_sha_path(path), digest + "\n")
    finally:
        if tmp.exists():
            tmp.unlink()


def _sha_path(path):
    return path.with_name(path.name + ".sha256")


def _write_text_atomic(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _shard_sha256(path):
    """A shard's sha256: from its .sha256 sidecar (written with it), else computed."""
    sidecar = _sha_path(path)
    if sidecar.is_file() and sidecar.stat().st_mtime >= path.stat().st_mtime:
        digest = sidecar.read_text().strip()
        if len(digest) == 64:
            return digest
    digest = _sha256_file(path)
    _write_text_atomic(sidecar, digest + "\n")
    return digest


def prepare_imagenet(src, out, *, size=256, shard_size=5000, val_labels=None, synsets=None,
                     max_per_class=None, workers=1, compression=None, progress=True):
    """Turn an ILSVRC folder into HDF5 shards + ``index.json`` (see the module docstring).

    Parameters
    ----------
    src : folder with ``train/`` and ``val/``
    out : output folder (created)
    size : side of the resized square images (256 in the paper)
    shard_size : images per shard
    val_labels : labels file for a flat ``val/`` (see ``read_val_labels``)
    synsets : ``LOC_synset_mapping.txt``/``synset_words.txt`` for class names
        (looked for in ``src`` when not given)
    max_per_class : keep at most this many training images per class (a subset)
    workers : decoding processes (1 = in this process)
    compression : None, "lzf" or "gzip" (h5py filters)
    progress : show a tqdm progress bar

    Returns
    -------
    dict with ``written`` and ``skipped`` shard file names and the per-split counts
    """
    src, out = Path(src), Path(out)
    classes, train_items = list_train(src / "train", max_per_class)
    val_items = list_val(src / "val", classes, val_labels)
    if synsets is None:
        synsets = next((p for p in (src / "LOC_synset_mapping.txt", src / "synset_words.txt")
                        if p.is_file()), None)
    names = read_synsets(synsets) if synsets else {}
    out.mkdir(parents=True, exist_ok=True)

    plan = []  # (split, shard file, items, fingerprint)
    for split, items in (("train", train_items), ("val", val_items)):
        num_shards = max(1, -(-len(items) // shard_size))
        for k in range(num_shards):
            chunk = items[k * shard_size:(k + 1) * shard_size]
            plan.append((split, f"{split}-{k:05d}-of-{num_shards:05d}.h5", chunk,
                         _fingerprint(chunk, src, size)))
    todo = [p for p in plan if not _shard_complete(out / p[1], p[3], len(p[2]))]
    todo_names = {p[1] for p in todo}
    skipped = [p[1] for p in plan if p[1] not in todo_names]

    from tqdm import tqdm
    total = sum(len(p[2]) for p in plan)
    # disable=None: no bar where stderr is not a terminal (a log file, CI)
    bar = tqdm(total=total, initial=total - sum(len(p[2]) for p in todo), unit="img",
               desc="prepare_imagenet", disable=None if progress else True)
    pool = None
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor
        pool = ProcessPoolExecutor(workers)

    def decode(paths):
        paths = list(paths)
        if pool is None:
            return (load_image(p, size) for p in paths)
        return pool.map(load_image, paths, [size] * len(paths), chunksize=16)

    try:
        for split, name, items, fingerprint in todo:
            bar.set_postfix_str(name)
            _write_shard(out / name, items, size, fingerprint, split, decode, compression,
                         bar.update)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()

    index = {
        "format": FORMAT, "version": FORMAT_VERSION, "image_size": size,
        "resize": "bilinear to size x size, aspect ratio not kept (as the paper)",
        "classes": classes, "class_names": [names.get(w, w) for w in classes] if names else None,
        "splits": {},
    }
    for split in ("train", "val"):
        shards = [{"file": name, "count": len(items), "sha256": _shard_sha256(out / name)}
                  for s, name, items, _ in plan if s == split]
        index["splits"][split] = {"count": sum(s["count"] for s in shards), "shards": shards}
    _write_text_atomic(out / INDEX_FILE, json.dumps(index, indent=1))
    counts = verify_imagenet(out, checksums=False)
    expected = {"train": len(train_items), "val": len(val_items)}
    if counts != expected:
        raise RuntimeError(f"{out}: count check failed: shards hold {counts}, "
                           f"source has {expected}")
    return {"written": [p[1] for p in todo], "skipped": skipped, "counts": counts}


def verify_imagenet(directory, checksums=True):
    """Check every shard of a prepared ImageNet against its ``index.json``.

    Opens each shard and checks its image and label counts, image shape and
    label range; with ``checksums`` also recomputes each shard's sha256.

    Returns
    -------
    dict: ``{"train": n_train, "val": n_val}`` images found
    Raises ValueError (or FileNotFoundError) naming the first bad shard.
    """
    directory = Path(directory)
    index = _read_index(directory / INDEX_FILE)
    num_classes = len(index["classes"])
    size = index["image_size"]
    counts = {}
    for split, info in index["splits"].items():
        total = 0
        for shard in info["shards"]:
            path = directory / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard listed in index.json is missing")
            if checksums and _sha256_file(path) != shard["sha256"]:
                raise ValueError(f"{path}: sha256 does not match index.json (corrupt shard)")
            with _naming_errors(path):
                with _h5py().File(path, "r") as f:
                    images_ds, labels_ds = _shard_datasets(f, path)
                    if images_ds.shape != (shard["count"], 3, size, size):
                        raise ValueError(f"{path}: images {images_ds.shape}, index.json "
                                         f"expects ({shard['count']}, 3, {size}, {size})")
                    labels = labels_ds[...]
            if labels.shape != (shard["count"],):
                raise ValueError(f"{path}: {labels.shape[0]} labels, index.json expects "
                                 f"{shard['count']}")
            check_labels(labels, num_classes, str(path))
            total += shard["count"]
        if total != info["count"]:
            raise ValueError(f"{directory / INDEX_FILE}: '{split}' count {info['count']} but "
                             f"its shards list {total}")
        counts[split] = total
    return counts
