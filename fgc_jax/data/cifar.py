"""The CIFAR-10/100 binary archives (`config.data.source='cifar_bin'`), read into memory.

Records keep their file order, which is their stable dataset index.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import ml_collections
import numpy as np

from fgc_jax.data import cifar_download
from fgc_jax.data.common import check_labels, frozen


@dataclasses.dataclass(frozen=True)
class BinaryLayout:
    """The CIFAR binary format: records of `header` label bytes + 3072 CHW pixel bytes."""

    subdir: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    header: int  # Label bytes per record; the last one is the (fine) label.
    num_classes: int

    @property
    def record_bytes(self) -> int:
        return self.header + 32 * 32 * 3


LAYOUTS = {
    "cifar10": BinaryLayout(
        "cifar-10-batches-bin",
        tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        ("test_batch.bin",),
        1,
        10,
    ),
    "cifar100": BinaryLayout(
        "cifar-100-binary",
        ("train.bin",),
        ("test.bin",),
        2,
        100,
    ),
}


def binary_files(config: ml_collections.ConfigDict, split: str) -> list[pathlib.Path]:
    """The CIFAR binary files of `split` (fetched on first use), checked for presence and whole
    records.

    The one place that finds the files: `config.data.dir` or its `subdir`.
    """
    layout = LAYOUTS[config.dataset]
    how = (
        f"Download {cifar_download.ARCHIVES[config.dataset].url}, extract it and set config.data.dir"
        f" to the {layout.subdir!r} directory (or its parent), or use config.data.source='tfds'."
    )
    root = cifar_download.prepare(
        config.dataset, config.data.dir, layout.train_files + layout.test_files,
        url=config.data.download_url, sha256=config.data.download_sha256)
    names = layout.train_files if split == "train" else layout.test_files
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{config.dataset} binary files {missing} not found in {root}. {how}"
        )
    paths = [root / n for n in names]
    for path in paths:
        size = path.stat().st_size
        if size == 0 or size % layout.record_bytes:
            raise ValueError(
                f"{path} has {size} bytes, not a positive multiple of the"
                f" {layout.record_bytes}-byte {config.dataset} record: the file is truncated"
                f" or of another format. {how}"
            )
    return paths


def num_examples(config: ml_collections.ConfigDict, split: str) -> int:
    """The number of records of `split`, from the file sizes alone."""
    record = LAYOUTS[config.dataset].record_bytes
    return sum(p.stat().st_size for p in binary_files(config, split)) // record


@functools.lru_cache(maxsize=4)
def _read(paths: tuple[pathlib.Path, ...], dataset: str) -> tuple[np.ndarray, np.ndarray]:
    layout = LAYOUTS[dataset]
    records = np.concatenate([np.fromfile(p, np.uint8) for p in paths])
    records = records.reshape(-1, layout.record_bytes)
    labels = records[:, layout.header - 1].astype(np.int32)
    check_labels(labels, layout.num_classes, ", ".join(map(str, paths)))
    images = records[:, layout.header :].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return frozen(np.ascontiguousarray(images)), frozen(labels)


def read(config: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`split` as uint8 NHWC images and int32 labels in file order, read once per process."""
    return _read(tuple(binary_files(config, split)), config.dataset)
