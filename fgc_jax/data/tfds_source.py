"""tfds datasets as array_record (`config.data.source='tfds'`), read by index.

Reading needs no TensorFlow, from a local disk or from `gs://` (array_record's reader has its
own Cloud Storage client; tests/test_imagenet_data.py reads through it from an emulator).
Preparation writes to a local disk only, so a `gs://` data_dir is prepared locally and copied
there. Preparing ImageNet from its two tars (once, by tfds's own
imagenet2012 builder) does: `pip install -e '.[imagenet]'`. Before tfds is asked to
prepare, `_check_preparation` names what is missing (a tar, TensorFlow) and refuses a
multi-process run, whose hosts would all prepare at once; tfds writes into an
`incomplete.*` directory and renames it only when complete, so a failed preparation
leaves nothing a later run takes for prepared data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
import importlib.util
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds

from fgc_jax import storage
from fgc_jax.data.common import check_labels, frozen, pool


def open_split(name: str, split: str, data_dir: str, manual_dir: str) -> Sequence[Mapping[str, Any]]:
    """Opens a tfds split for random access; prepares it from `manual_dir` when given."""
    data_dir = data_dir or None
    if name == "imagenet2012" and manual_dir:
        _check_preparation(data_dir, manual_dir)
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


IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
# What tfds's imagenet2012 builder imports to prepare, and the extra that installs it.
PREPARATION_MODULES = ("tensorflow", "importlib_resources")
INSTALL_PREPARATION = "pip install -e '.[imagenet]'"


def _check_preparation(data_dir: str | None, manual_dir: str) -> None:
    """One line for each reason tfds cannot prepare imagenet2012 from `manual_dir` here."""
    builder = tfds.builder("imagenet2012", data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return
    where = f"data_dir={data_dir or 'the tfds default (~/tensorflow_datasets)'}"
    if data_dir and storage.is_remote(data_dir):
        raise ValueError(
            f"imagenet2012 is not prepared under {where}, and tfds writes array_record files to a"
            " local disk only (it would fail at the end of the first split); prepare it once into"
            f" a local directory: `tfds build imagenet2012 --manual_dir={manual_dir}"
            " --data_dir=LOCAL_DIR --file_format=array_record`, copy it (`gcloud storage cp -r"
            f" LOCAL_DIR/imagenet2012 {data_dir}/`), then run with no --config.data.manual_dir")
    if jax.process_count() > 1:
        raise ValueError(
            f"imagenet2012 is not prepared under {where}, and each of the {jax.process_count()}"
            " processes would prepare it at once; prepare it once, from one machine, into a"
            f" data_dir every host reads: `tfds build imagenet2012 --manual_dir={manual_dir}"
            " --data_dir=DATA_DIR --file_format=array_record`, then run with"
            " --config.data.dir=DATA_DIR and no --config.data.manual_dir")
    missing = [t for t in IMAGENET_TARS if not (tfds.core.Path(manual_dir) / t).exists()]
    if missing:
        raise FileNotFoundError(
            f"imagenet2012 is not prepared under {where} and config.data.manual_dir={manual_dir}"
            f" lacks {' and '.join(missing)}; put both ILSVRC2012 tars there (or read the extracted"
            " folders with config.data.source='imagenet_folder')")
    absent = [m for m in PREPARATION_MODULES if importlib.util.find_spec(m) is None]
    if absent:
        raise ValueError(
            f"preparing imagenet2012 from {manual_dir} (once) runs tfds's builder, which needs"
            f" {' and '.join(absent)}: {INSTALL_PREPARATION}; or read the extracted folders with"
            " config.data.source='imagenet_folder', which needs neither")


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
