"""Writes a small ImageNet in the real formats, from real photographs, for tests and demos.

    python -m fgc_jax.data.imagenet_sample --cifar_dir=../shared/data/cifar10-mini --out=DIR

writes both layouts a user may have:

  * DIR/tars/ILSVRC2012_img_train.tar (one `<synset>.tar` per class of `<synset>_<n>.JPEG`)
    and DIR/tars/ILSVRC2012_img_val.tar (`ILSVRC2012_val_<8 digits>.JPEG`): what tfds's
    imagenet2012 builder prepares from `manual_dir`;
  * DIR/folder/train/<synset>/*.JPEG and DIR/folder/val/<synset>/*.JPEG: the extracted
    ImageFolder layout (`config.data.source='imagenet_folder'`, `config.data.dir`).

The val images are numbered 1..V, so tfds labels image N with line N of its own
validation label file; the sample's synsets are those labels plus the synsets of the
quirky file names tfds knows (a CMYK JPEG, a PNG named .JPEG). Pictures are CIFAR-10
photographs upscaled to ImageNet-like sizes (100-500 px, non-square); a synset's pictures
come from one CIFAR class, so the sample is learnable. Quirks, as in real ImageNet: a
grayscale JPEG in each split, tfds's CMYK file name as a CMYK JPEG, tfds's PNG file name as
a PNG, a very small and a very elongated image.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import shutil
import tarfile
from typing import Sequence

import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from fgc_jax.data import cifar

# File names tfds's imagenet2012 builder fixes by name (imagenet2012_dataset_builder.py).
CMYK_NAME = "n01739381_1309.JPEG"
PNG_NAME = "n02105855_2933.JPEG"
# Image sizes (height, width) of the two shape quirks.
SMALL_SIZE = (17, 23)
ELONGATED_SIZE = (40, 500)


def validation_synsets(count: int) -> list[str]:
    """The synsets of val images 1..count, from tfds's own validation label file."""
    path = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")
    return path.read_text().split()[:count]


def _picture(photo: np.ndarray, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(photo).resize(size[::-1], Image.Resampling.BICUBIC)


def _encode(image: Image.Image, how: str) -> bytes:
    buffer = io.BytesIO()
    if how == "png":
        image.save(buffer, format="PNG")
    else:
        mode = {"gray": "L", "cmyk": "CMYK", "rgb": "RGB"}[how]
        image.convert(mode).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write(cifar_dir: str | pathlib.Path, out: str | pathlib.Path, *, num_val: int = 24,
          train_per_class: int = 8, seed: int = 0) -> dict[str, int]:
    """Writes the sample under `out` (replaced if present); returns its split sizes."""
    out = pathlib.Path(out)
    config = ml_collections.ConfigDict({"dataset": "cifar10", "data": {
        "dir": str(cifar_dir), "download_url": "", "download_sha256": ""}})  # fetched if absent
    train_photos, train_classes = cifar.read(config, "train")
    val_photos, val_classes = cifar.read(config, "test")
    val_synsets = validation_synsets(num_val)
    synsets = sorted(set(val_synsets) | {CMYK_NAME[:9], PNG_NAME[:9]})
    cifar_class = {s: i % 10 for i, s in enumerate(synsets)}
    rng = np.random.default_rng(seed)
    used = {"train": set(), "val": set()}

    def photo(split: str, synset: str) -> np.ndarray:
        photos, classes = (train_photos, train_classes) if split == "train" else (val_photos, val_classes)
        candidates = [i for i in np.flatnonzero(classes == cifar_class[synset]) if i not in used[split]]
        used[split].add(candidates[0])
        return photos[candidates[0]]

    def size() -> tuple[int, int]:
        height, width = rng.integers(100, 501, 2)
        return (int(height), int(width)) if height != width else (int(height), int(width) - 1)

    # The pictures: (split, synset, file name) -> encoded bytes, quirks included.
    train: dict[str, dict[str, bytes]] = {s: {} for s in synsets}
    for synset in synsets:
        for n in range(train_per_class):
            train[synset][f"{synset}_{n}.JPEG"] = _encode(_picture(photo("train", synset), size()), "rgb")
    train[CMYK_NAME[:9]][CMYK_NAME] = _encode(_picture(photo("train", CMYK_NAME[:9]), size()), "cmyk")
    train[PNG_NAME[:9]][PNG_NAME] = _encode(_picture(photo("train", PNG_NAME[:9]), size()), "png")
    first, second = synsets[0], synsets[1]
    train[first][f"{first}_0.JPEG"] = _encode(_picture(photo("train", first), size()), "gray")
    train[first][f"{first}_1.JPEG"] = _encode(_picture(photo("train", first), SMALL_SIZE), "rgb")
    train[second][f"{second}_0.JPEG"] = _encode(_picture(photo("train", second), ELONGATED_SIZE), "rgb")
    val = {}
    for n, synset in enumerate(val_synsets, start=1):
        how = "gray" if n == 1 else "rgb"
        val[f"ILSVRC2012_val_{n:08d}.JPEG"] = (synset, _encode(_picture(photo("val", synset), size()), how))

    if out.exists():
        shutil.rmtree(out)
    tars, folder = out / "tars", out / "folder"
    tars.mkdir(parents=True)
    with tarfile.open(tars / "ILSVRC2012_img_train.tar", "w") as outer:
        for synset in synsets:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for name, data in sorted(train[synset].items()):
                    _add(tar, name, data)
                    path = folder / "train" / synset / name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
            _add(outer, f"{synset}.tar", inner.getvalue())
    with tarfile.open(tars / "ILSVRC2012_img_val.tar", "w") as tar:
        for name, (synset, data) in sorted(val.items()):
            _add(tar, name, data)
            path = folder / "val" / synset / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return {"train": sum(len(files) for files in train.values()), "validation": len(val),
            "classes": len(synsets)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar_dir", required=True, help="CIFAR-10 binaries (cifar-10-batches-bin)")
    parser.add_argument("--out", required=True, help="written: OUT/tars and OUT/folder (replaced)")
    parser.add_argument("--num_val", type=int, default=24, help="val images 1..num_val")
    parser.add_argument("--train_per_class", type=int, default=8)
    args = parser.parse_args(argv)
    sizes = write(args.cifar_dir, args.out, num_val=args.num_val, train_per_class=args.train_per_class)
    print(f"{sizes['train']} train and {sizes['validation']} val images of {sizes['classes']} synsets"
          f" in {args.out}/tars and {args.out}/folder")


if __name__ == "__main__":
    main()
