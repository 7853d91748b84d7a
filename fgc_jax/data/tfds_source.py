"""tfds datasets as array_record (`config.data.source='tfds'`), read by index.

Reading needs no TensorFlow; preparing ImageNet from its tars (once) does: see
`imagenet_prepare`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from fgc_jax.data.common import check_labels, frozen, pool


def open_split(name: str, split: str, data_dir: str, manual_dir: str) -> Sequence[Mapping[str, Any]]:
    """Opens a tfds split for random access; prepares it from `manual_dir` when given."""
    data_dir = data_dir or None
    try:
        return tfds.data_source(
            name,
            split=split,
            data_dir=data_dir,
            download=bool(manual_dir),
            builder_kwargs={"file_format": "array_record"},
            download_and_prepare_kwargs={
                "download_config": tfds.download.DownloadConfig(manual_dir=manual_dir or None)
            },
        )
    except Exception as e:  # tfds raises many types here; all mean "not available".
        if name == "imagenet2012":
            how = (
                "Put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in a directory and set"
                " config.data.manual_dir to it (the first run then prepares the data), or run"
                " `tfds build imagenet2012 --manual_dir=DIR --file_format=array_record` once."
            )
        else:
            how = (
                f"Run `tfds build {name} --file_format=array_record` once on a machine with"
                " internet access, or use config.data.source='cifar_bin' with the binary archive."
            )
        raise FileNotFoundError(
            f"tfds {name}[{split}] is not available as array_record under data_dir="
            f"{data_dir or 'the tfds default (~/tensorflow_datasets)'}: {e}\n{how}"
        ) from e


@functools.lru_cache(maxsize=4)
def read(
    name: str, split: str, data_dir: str, manual_dir: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a small tfds split (CIFAR) into memory in split order."""
    source = open_split(name, split, data_dir, manual_dir)
    examples = list(pool().map(source.__getitem__, range(len(source))))
    images = np.stack([ex["image"] for ex in examples])
    labels = np.array([ex["label"] for ex in examples], np.int32)
    check_labels(labels, num_classes, f"tfds {name}[{split}]")
    return frozen(images), frozen(labels)
