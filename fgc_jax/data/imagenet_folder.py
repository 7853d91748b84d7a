"""Extracted ImageNet in torchvision's ImageFolder layout (`config.data.source='imagenet_folder'`).

    ROOT/train/n01440764/n01440764_10026.JPEG ...
    ROOT/val/n01440764/ILSVRC2012_val_00000293.JPEG ...

(the val images sorted into synset folders, as the usual `valprep.sh` does). Read as it
is: no preparation step and no TensorFlow. An example's stable index is its position
in the sorted paths of its split; its label is the synset's position in tfds's
imagenet2012 label list (the 1,000 synsets sorted), so labels agree with the tfds route
and with torchvision's ImageFolder on the full dataset.

Decoding handles real ImageNet's quirks (grayscale and CMYK JPEGs, the PNG stored
under a .JPEG name) by converting every image to RGB with PIL. A file PIL cannot
open stops the run with one line naming it: at start-up (`check_headers`, which every
training run does) or, for damage past the header, in

    python -m fgc_jax.data.imagenet_folder --dir=ROOT      # decodes every file once
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import os
import pathlib
import sys
import time
from typing import Any

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from fgc_jax.data.common import frozen, pool

# The split names the pipeline uses -> the folder that holds them.
SPLIT_DIRS = {"train": "train", "validation": "val"}
# What counts as an image file (case-insensitively), as torchvision's IMG_EXTENSIONS.
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_LAYOUT = ("config.data.dir must hold train/<synset>/*.JPEG and val/<synset>/*.JPEG"
           " (torchvision's ImageFolder layout, val sorted into synset folders)")


class UndecodableImageError(ValueError):
    """An image file that PIL cannot open or decode."""


@functools.cache
def synsets() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k synset ids in label order (tfds's imagenet2012 labels.txt)."""
    path = tfds.core.tfds_path("datasets/imagenet2012/labels.txt")
    return tuple(path.read_text().split())


@functools.lru_cache(maxsize=4)
def _listing(root: str, split: str) -> tuple[tuple[str, ...], np.ndarray]:
    """(sorted image paths, int32 labels) of `split`, the layout checked on the way."""
    if not root:
        raise ValueError(f"config.data.source='imagenet_folder' needs config.data.dir: {_LAYOUT}.")
    directory = pathlib.Path(root).expanduser() / SPLIT_DIRS[split]
    if not directory.is_dir():
        raise FileNotFoundError(f"ImageNet {SPLIT_DIRS[split]} folder {directory} not found: {_LAYOUT}.")
    entries = sorted(os.scandir(directory), key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir()]
    loose = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)]
    if loose or not classes:
        what = (f"holds {len(loose)} images outside synset folders (e.g. {loose[0]}): its labels are"
                " unknown; sort them into synset folders (e.g. with the usual valprep.sh)"
                if loose else "has no synset sub-folders (n01440764, ...)")
        raise ValueError(f"ImageNet {SPLIT_DIRS[split]} folder {directory} {what}; {_LAYOUT}.")
    label_of = {s: i for i, s in enumerate(synsets())}
    unknown = [c for c in classes if c not in label_of]
    if unknown:
        raise ValueError(f"{directory / unknown[0]} is not an ImageNet-1k synset id ({len(unknown)}"
                         f" such folder(s)); {_LAYOUT}.")

    def images(name: str) -> list[str]:
        with os.scandir(directory / name) as it:
            return sorted(e.path for e in it if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))

    per_class = list(pool().map(images, classes))
    empty = [c for c, files in zip(classes, per_class) if not files]
    if empty:
        raise ValueError(f"ImageNet class folder {directory / empty[0]} holds no images"
                         f" ({len(empty)} empty class folder(s)); remove it or extract its images.")
    paths = tuple(p for files in per_class for p in files)
    labels = np.repeat([label_of[c] for c in classes], [len(f) for f in per_class]).astype(np.int32)
    return paths, frozen(labels)


def decode(path: str) -> np.ndarray:
    """The image at `path` as uint8 RGB [H, W, 3], whatever its mode or format."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UndecodableImageError(
            f"cannot decode {path} ({type(e).__name__}: {e}); replace or remove the file") from e


class ImageFolder(Sequence):
    """One split as a random-access sequence of {'image': uint8 RGB HWC, 'label': int32}."""

    def __init__(self, root: str, split: str):
        self.paths, self.labels = _listing(str(root), split)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": decode(self.paths[index]), "label": self.labels[index]}


def _header_problem(path: str) -> str | None:
    try:
        with Image.open(path) as image:
            if min(image.size) < 1:
                return f"{path} has size {image.size}"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"{path} ({type(e).__name__}: {e})"
    return None


def _decode_problem(path: str) -> str | None:
    try:
        decode(path)
    except UndecodableImageError as e:
        return str(e)
    return None


def scan(root: str, *, full: bool) -> list[str]:
    """One line per bad file of both splits: each header (fast) or each whole image (`full`)."""
    check = _decode_problem if full else _header_problem
    problems = []
    for split in SPLIT_DIRS:
        problems += [p for p in pool().map(check, ImageFolder(root, split).paths) if p]
    return problems


@functools.lru_cache(maxsize=4)
def check_headers(root: str) -> None:
    """Opens every file's header (both splits) so that a file PIL cannot read stops the run
    before training, naming the file; `python -m fgc_jax.data.imagenet_folder` decodes fully."""
    start = time.perf_counter()
    problems = scan(root, full=False)
    logging.info("opened the header of every ImageNet file in %s in %.1f s", root,
                 time.perf_counter() - start)
    if problems:
        raise UndecodableImageError(
            f"{len(problems)} ImageNet file(s) cannot be read as images, e.g. {problems[0]}; replace"
            f" or remove them (`python -m fgc_jax.data.imagenet_folder --dir={root}` lists all)")


def main(argv: Sequence[str] | None = None) -> int:
    """The scan command: decodes every image of ROOT's train and val folders once."""
    import argparse

    parser = argparse.ArgumentParser(description="Decode every image of an extracted ImageNet once"
                                     " and list each file that cannot be decoded.")
    parser.add_argument("--dir", required=True, help="ROOT holding train/<synset>/ and val/<synset>/")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        problems = scan(args.dir, full=True)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    count = sum(len(ImageFolder(args.dir, s)) for s in SPLIT_DIRS)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    print(f"{count} images decoded in {time.perf_counter() - start:.1f} s; {len(problems)} bad.")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
