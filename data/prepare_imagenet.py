#!/usr/bin/env python3
"""ILSVRC-2012 folder -> HDF5 shards of 256x256 images that tinynorm reads.

    python data/prepare_imagenet.py --src /data/ILSVRC2012 --out data/imagenet

SRC holds train/<wnid>/*.JPEG and val/ (class folders, or flat images with a
labels file: --val-labels val_labels.txt with "filename label" lines, or
Kaggle's LOC_val_solution.csv, found automatically next to val/).  Each image is
resized to 256x256 (bilinear, aspect ratio *not* kept: the paper rescales to
256x256) and stored as uint8 (3, 256, 256).  OUT receives train-*.h5,
val-*.h5, a .sha256 beside each, and index.json.

Resumable: rerun the same command after an interruption; finished shards
(written to a temporary file and renamed into place) are kept, the rest are
redone.  At the end every shard is reopened and the image counts are checked
against the source; --verify also re-hashes every shard against index.json.
About 252 GB for the full training set uncompressed (--compression lzf
shrinks it at some CPU cost).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, type=Path,
                   help="ILSVRC folder with train/ and val/")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "imagenet",
                   help="output folder (default: data/imagenet beside this script)")
    p.add_argument("--size", type=int, default=256, help="side of the square images (256)")
    p.add_argument("--shard-size", type=int, default=5000, help="images per HDF5 shard")
    p.add_argument("--val-labels", type=Path, default=None,
                   help="labels for a flat val/: 'filename label' lines (label = wnid or "
                        "class index) or LOC_val_solution.csv")
    p.add_argument("--synsets", type=Path, default=None,
                   help="LOC_synset_mapping.txt or synset_words.txt for class names "
                        "(looked for in --src when omitted)")
    p.add_argument("--max-per-class", type=int, default=None,
                   help="keep at most N training images per class (a smaller subset)")
    p.add_argument("--workers", type=int, default=1, help="decoding processes")
    p.add_argument("--compression", choices=["none", "lzf", "gzip"], default="none")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verify", action="store_true",
                   help="after writing, re-hash every shard against index.json")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from tinynorm.datasets.imagenet import prepare_imagenet, verify_imagenet
    except ImportError:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tinynorm.datasets.imagenet import prepare_imagenet, verify_imagenet
    try:
        summary = prepare_imagenet(
            args.src, args.out, size=args.size, shard_size=args.shard_size,
            val_labels=args.val_labels, synsets=args.synsets,
            max_per_class=args.max_per_class, workers=args.workers,
            compression=None if args.compression == "none" else args.compression,
            progress=not args.no_progress)
        if args.verify:
            verify_imagenet(args.out, checksums=True)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"prepare_imagenet: error: {e}", file=sys.stderr)
        return 1
    counts = summary["counts"]
    print(f"{args.out}: {counts['train']} training and {counts['val']} validation images; "
          f"{len(summary['written'])} shard(s) written, {len(summary['skipped'])} already "
          f"complete; count check passed" + ("; checksums verified" if args.verify else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
