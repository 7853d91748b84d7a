"""Indexed, sharded, resumable input pipelines for CIFAR-10/100, ImageNet and digits.

FGC keeps one memory-bank row per training example, so every training example
carries its stable dataset index: its position 0..N-1 in the canonical order of
the source (file order for the CIFAR binaries, split order for tfds, array order
for scikit-learn's digits), the same across epochs, restarts and host counts.

Determinism. The order of epoch `e` is a permutation drawn from (seed, e); the
augmentation of step `s` is drawn from (seed, s) for the whole global batch, and
each process keeps its contiguous slice. A batch is therefore a pure function of
(config, step): resuming at step k reproduces an uninterrupted run bitwise, and
the union of the processes' slices does not depend on the number of processes.

Sources:
  * `cifar_bin`: the standard CIFAR binary archives in `config.data.dir`.
  * `tfds`: `tfds.data_source` (array_record, no TensorFlow needed). CIFAR is
    read into memory once; ImageNet is read by index and decoded per batch.
  * `sklearn`: scikit-learn's bundled 8x8 digits (offline quickstart).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
import concurrent.futures
import dataclasses
import functools
import itertools
import math
import os
import pathlib
import queue
import threading
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from fgc_jax import data_parallel

Batch = dict[str, np.ndarray]

# Digits: the first 1,437 of scikit-learn's 1,797 images train, the last 360 test.
DIGITS_NUM_TRAIN = 1437
# Mean/std of the digits train split after scaling 0..16 -> 0..255 -> [0, 1].
DIGITS_MEAN = (0.3054,)
DIGITS_STD = (0.3753,)
# Normalisation of the FGC reference (FGC_SPEC.md §3).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
# The usual CIFAR-100 train-set statistics.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Inception-style random-resized-crop parameters (as torchvision's defaults).
_CROP_SCALE = (0.08, 1.0)
_CROP_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
_CROP_ATTEMPTS = 10
# Eval: resize the short side to image_size / 0.875 (256 for 224), centre crop.
_EVAL_CROP_FRACTION = 0.875

# Independent random streams derived from config.seed.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static facts about a dataset."""

    num_classes: int
    sources: tuple[str, ...]
    test_split: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int = 0  # Zero padding before the random crop (in-memory datasets).
    flip: bool = False  # Random horizontal flips (in-memory datasets).


_SPECS = {
    "cifar10": _Spec(10, ("cifar_bin", "tfds"), "test", CIFAR10_MEAN, CIFAR10_STD, 4, True),
    "cifar100": _Spec(100, ("cifar_bin", "tfds"), "test", CIFAR100_MEAN, CIFAR100_STD, 4, True),
    "imagenet2012": _Spec(1000, ("tfds",), "validation", IMAGENET_MEAN, IMAGENET_STD),
    "digits": _Spec(10, ("sklearn",), "test", DIGITS_MEAN, DIGITS_STD, 1, False),
}


@dataclasses.dataclass(frozen=True)
class _BinaryLayout:
    """The CIFAR binary format: records of `header` label bytes + 3072 CHW pixel bytes."""

    subdir: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    header: int  # Label bytes per record; the last one is the (fine) label.
    url: str

    @property
    def record_bytes(self) -> int:
        return self.header + 32 * 32 * 3


_BINARY_LAYOUTS = {
    "cifar10": _BinaryLayout(
        "cifar-10-batches-bin",
        tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        ("test_batch.bin",),
        1,
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    ),
    "cifar100": _BinaryLayout(
        "cifar-100-binary",
        ("train.bin",),
        ("test.bin",),
        2,
        "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    ),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the training loop need to know about a dataset."""

    name: str
    num_train: int
    num_test: int
    num_classes: int
    image_shape: tuple[int, int, int]  # HWC of the model input.


# ----------------------------------------------------------------------------
# Config validation and sources.
# ----------------------------------------------------------------------------


def _spec(config: ml_collections.ConfigDict) -> _Spec:
    """Checks the data fields of `config` and returns the dataset's spec."""
    name, source = config.dataset, config.data.source
    if name not in _SPECS:
        raise ValueError(f"Unknown config.dataset={name!r}; expected one of {sorted(_SPECS)}.")
    spec = _SPECS[name]
    if source not in spec.sources:
        raise ValueError(
            f"config.data.source={source!r} cannot serve config.dataset={name!r}; use one of"
            f" {list(spec.sources)} (cifar_bin: CIFAR-10/100 only; sklearn: digits only;"
            " imagenet2012: tfds only)."
        )
    if not isinstance(config.data.prefetch, int) or config.data.prefetch < 0:
        raise ValueError(f"config.data.prefetch must be an int >= 0, got {config.data.prefetch!r}.")
    if name == "imagenet2012" and config.data.image_size <= 0:
        raise ValueError(f"config.data.image_size must be positive, got {config.data.image_size}.")
    return spec


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"Labels in {where} span [{labels.min()}, {labels.max()}], outside [0, {num_classes});"
            " the files are corrupt or belong to another dataset (check config.dataset)."
        )


def _binary_files(config: ml_collections.ConfigDict, split: str) -> list[pathlib.Path]:
    """The CIFAR binary files of `split`, checked for presence and whole records."""
    layout = _BINARY_LAYOUTS[config.dataset]
    how = (
        f"Download {layout.url}, extract it and set config.data.dir to the {layout.subdir!r}"
        " directory (or its parent), or use config.data.source='tfds'."
    )
    if not config.data.dir:
        raise ValueError(f'config.data.source="cifar_bin" needs config.data.dir. {how}')
    root = pathlib.Path(config.data.dir).expanduser()
    if (root / layout.subdir).is_dir():
        root = root / layout.subdir
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


@functools.lru_cache(maxsize=4)
def _read_binary(paths: tuple[pathlib.Path, ...], dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads CIFAR binary files into uint8 NHWC images and int32 labels, in file order."""
    layout = _BINARY_LAYOUTS[dataset]
    records = np.concatenate([np.fromfile(p, np.uint8) for p in paths])
    records = records.reshape(-1, layout.record_bytes)
    labels = records[:, layout.header - 1].astype(np.int32)
    _check_labels(labels, _SPECS[dataset].num_classes, ", ".join(map(str, paths)))
    images = records[:, layout.header :].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _frozen(np.ascontiguousarray(images)), _frozen(labels)


def _open_tfds(
    name: str, split: str, data_dir: str, manual_dir: str
) -> Sequence[Mapping[str, Any]]:
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
def _read_tfds(
    name: str, split: str, data_dir: str, manual_dir: str
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a small tfds split (CIFAR) into memory in split order."""
    source = _open_tfds(name, split, data_dir, manual_dir)
    examples = list(_pool().map(source.__getitem__, range(len(source))))
    images = np.stack([ex["image"] for ex in examples])
    labels = np.array([ex["label"] for ex in examples], np.int32)
    _check_labels(labels, _SPECS[name].num_classes, f"tfds {name}[{split}]")
    return _frozen(images), _frozen(labels)


@functools.lru_cache(maxsize=2)
def _read_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 [N, 8, 8, 1] in 0..255; deterministic split."""
    from sklearn.datasets import load_digits  # Here: only the quickstart needs scikit-learn.

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    part = slice(None, DIGITS_NUM_TRAIN) if split == "train" else slice(DIGITS_NUM_TRAIN, None)
    return _frozen(images[part]), _frozen(labels[part])


def _frozen(x: np.ndarray) -> np.ndarray:
    """Marks a cached array read-only, so no caller can alter the shared copy."""
    x.flags.writeable = False
    return x


def _in_memory(config: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A whole split as (uint8 NHWC images, int32 labels), loaded once per process."""
    if config.data.source == "cifar_bin":
        return _read_binary(tuple(_binary_files(config, split)), config.dataset)
    if config.data.source == "sklearn":
        return _read_digits(split)
    return _read_tfds(config.dataset, split, config.data.dir, config.data.manual_dir)



def check_labels(config: ml_collections.ConfigDict) -> None:
    """Loads both splits of an in-memory dataset (CIFAR, digits), checking every label, so bad
    files fail before any training; ImageNet's labels are checked as its batches are decoded."""
    if config.dataset != "imagenet2012":
        for split in ("train", _spec(config).test_split):
            _in_memory(config, split)

@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for decoding and per-example transforms (PIL and NumPy release the GIL)."""
    return concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1, "fgc_input")


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    """Validates `config` and the data's availability; cheap, so call it before compiling.

    For tfds ImageNet with `config.data.manual_dir` set, the first call prepares the
    array_record files (hours, once).
    """
    spec = _spec(config)
    name = config.dataset
    if config.data.source == "cifar_bin":
        record = _BINARY_LAYOUTS[name].record_bytes
        num_train, num_test = (
            sum(p.stat().st_size for p in _binary_files(config, split)) // record
            for split in ("train", "test")
        )
    elif config.data.source == "sklearn":
        num_train, num_test = DIGITS_NUM_TRAIN, 1797 - DIGITS_NUM_TRAIN
    else:
        num_train, num_test = (
            len(_open_tfds(name, split, config.data.dir, config.data.manual_dir))
            for split in ("train", spec.test_split)
        )
    shape, num_classes = input_spec(config)
    return DatasetInfo(name, num_train, num_test, num_classes, shape)


def input_spec(config: ml_collections.ConfigDict) -> tuple[tuple[int, int, int], int]:
    """(model input shape HWC, number of classes) of `config.dataset`; needs no data."""
    spec = _spec(config)
    if config.dataset == "imagenet2012":
        shape = (config.data.image_size, config.data.image_size, 3)
    else:
        shape = (8, 8, 1) if config.dataset == "digits" else (32, 32, 3)
    return shape, spec.num_classes


# ----------------------------------------------------------------------------
# Transforms. Each pipeline maps dataset indices (+ random draws) to a batch.
# ----------------------------------------------------------------------------


class _Normaliser:
    """uint8 -> float32 `(x / 255 - mean) / std`, as one multiply-add."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        std = np.asarray(std, np.float64)
        self._scale = (1 / (255 * std)).astype(np.float32)
        self._shift = (-np.asarray(mean) / std).astype(np.float32)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return images.astype(np.float32) * self._scale + self._shift


def _crop_and_flip(
    images: np.ndarray, pad: int, offsets: np.ndarray, flips: np.ndarray
) -> np.ndarray:
    """Random crops of the zero-padded images at `offsets` (row, col), optionally mirrored."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = offsets[:, :1] + np.arange(h)
    cols = offsets[:, 1:] + np.where(flips[:, None], np.arange(w)[::-1], np.arange(w))
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


class _ArrayPipeline:
    """CIFAR/digits: the split in memory; augmentation vectorised over the batch."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, spec: _Spec):
        self._images, self._labels, self._spec = images, labels, spec
        self._normalise = _Normaliser(spec.mean, spec.std)

    def __len__(self) -> int:
        return len(self._labels)

    def train_batch(
        self, indices: np.ndarray, rng: np.random.Generator, local: slice, global_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pad + random crop (+ flip); draws cover the global batch, `local` picks ours."""
        offsets = rng.integers(0, 2 * self._spec.pad + 1, size=(global_size, 2))[local]
        flips = (rng.random(global_size) < 0.5)[local] & self._spec.flip
        images = _crop_and_flip(self._images[indices], self._spec.pad, offsets, flips)
        return self._normalise(images), self._labels[indices]

    def eval_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._normalise(self._images[indices]), self._labels[indices]


def _random_crop_box(height: int, width: int, draws: np.ndarray) -> tuple[int, int, int, int]:
    """Inception-style crop box (left, top, right, bottom) from uniform `draws` [attempts, 4].

    Each attempt uses (area fraction, log aspect ratio, x, y) draws; if no attempt
    fits, falls back to a centre crop clamped to the ratio range (as torchvision).
    """
    area = height * width
    for u_scale, u_ratio, u_x, u_y in draws:
        target = area * (_CROP_SCALE[0] + u_scale * (_CROP_SCALE[1] - _CROP_SCALE[0]))
        ratio = math.exp(_CROP_LOG_RATIO[0] + u_ratio * (_CROP_LOG_RATIO[1] - _CROP_LOG_RATIO[0]))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(u_x * (width - w + 1)), int(u_y * (height - h + 1))
            return left, top, left + w, top + h
    ratio = width / height
    w, h = width, height
    if ratio < 3 / 4:
        h = round(width * 4 / 3)
    elif ratio > 4 / 3:
        w = round(height * 4 / 3)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _centre_crop_box(height: int, width: int) -> tuple[float, float, float, float]:
    """The square that resize-short-side-to-S/0.875 + centre-crop-S keeps, in input pixels."""
    side = _EVAL_CROP_FRACTION * min(height, width)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


class _DecodedPipeline:
    """ImageNet: examples read by index, decoded and transformed one by one in threads."""

    def __init__(self, source: Sequence[Mapping[str, Any]], spec: _Spec, image_size: int):
        self._source, self._spec, self._size = source, spec, image_size
        self._normalise = _Normaliser(spec.mean, spec.std)

    def __len__(self) -> int:
        return len(self._source)

    def _batch(
        self, indices: np.ndarray, crop: Callable[[int, np.ndarray], np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Reads example k, applies `crop(k, image)`; writes normalised floats in place."""
        images = np.empty((len(indices), self._size, self._size, 3), np.float32)
        labels = np.empty(len(indices), np.int32)

        def one(k: int) -> None:
            example = self._source[int(indices[k])]
            labels[k] = example["label"]
            images[k] = self._normalise(crop(k, example["image"]))

        list(_pool().map(one, range(len(indices))))
        _check_labels(labels, self._spec.num_classes, "tfds imagenet2012")
        return images, labels

    def _resize(self, image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        size = (self._size, self._size)
        return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, box=box))

    def train_batch(
        self, indices: np.ndarray, rng: np.random.Generator, local: slice, global_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Random-resized crop to image_size + flip; draws cover the global batch."""
        draws = rng.random((global_size, _CROP_ATTEMPTS, 4))[local]
        flips = (rng.random(global_size) < 0.5)[local]

        def crop(k: int, image: np.ndarray) -> np.ndarray:
            out = self._resize(image, _random_crop_box(*image.shape[:2], draws[k]))
            return out[:, ::-1] if flips[k] else out

        return self._batch(indices, crop)

    def eval_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        def crop(k: int, image: np.ndarray) -> np.ndarray:
            return self._resize(image, _centre_crop_box(*image.shape[:2]))

        return self._batch(indices, crop)


def _pipeline(config: ml_collections.ConfigDict, split: str) -> _ArrayPipeline | _DecodedPipeline:
    spec = _spec(config)
    if config.dataset == "imagenet2012":
        source = _open_tfds(config.dataset, split, config.data.dir, config.data.manual_dir)
        return _DecodedPipeline(source, spec, config.data.image_size)
    return _ArrayPipeline(*_in_memory(config, split), spec)


# ----------------------------------------------------------------------------
# Loaders.
# ----------------------------------------------------------------------------


def _process_slice(
    global_batch_size: int, process_index: int | None, process_count: int | None
) -> slice:
    """This process's contiguous slice of a global batch."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch_size <= 0 or global_batch_size % count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of the process"
            f" count ({count}); choose a batch size divisible by the number of hosts."
        )
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} is outside [0, {count}).")
    local = global_batch_size // count
    return slice(index * local, (index + 1) * local)


_END = object()


def _prefetch(batches: Iterator[Batch], size: int) -> Iterator[Batch]:
    """Runs `batches` in a background thread, `size` batches ahead (0: inline).

    Errors in the thread are re-raised in the consumer; closing the returned
    generator stops the thread.
    """
    if size == 0:
        yield from batches
        return
    buffer: queue.Queue[Any] = queue.Queue(size)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(_END)
        except BaseException as e:  # Re-raised in the consumer's thread.
            put(e)

    thread = threading.Thread(target=produce, name="fgc_prefetch", daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class TrainLoader:
    """Infinite, shuffled, augmented training batches with dataset indices.

    Step s belongs to epoch s // steps_per_epoch, and every epoch visits every training
    example exactly once (spec §3): its last global batch, if smaller, is padded to the
    static batch size. Each process yields its contiguous slice of every global batch:
    'image' float32 [local, H, W, C], 'label' int32, 'index' int32 (-1 on padding) and
    'mask' bool (False on padding, whose image and label are zeros).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        *,
        global_batch_size: int,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.info = dataset_info(config)
        self._local = _process_slice(global_batch_size, process_index, process_count)
        self.global_batch_size = global_batch_size
        self.local_batch_size = self._local.stop - self._local.start
        if global_batch_size > self.info.num_train:
            raise ValueError(
                f"global_batch_size={global_batch_size} exceeds the {self.info.num_train} training"
                " examples; use a smaller batch."
            )
        self.steps_per_epoch = -(-self.info.num_train // global_batch_size)
        self._seed = config.seed
        self._prefetch = config.data.prefetch
        self._pipeline = _pipeline(config, "train")

    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self._seed, _SHUFFLE_STREAM, epoch])
        return rng.permutation(len(self._pipeline))

    def _generate(self, start_step: int) -> Iterator[Batch]:
        batch, epoch, order = self.global_batch_size, None, None
        for step in itertools.count(start_step):
            step_epoch, position = divmod(step, self.steps_per_epoch)
            if step_epoch != epoch:
                epoch, order = step_epoch, self._permutation(step_epoch)
            indices = np.full(batch, -1, np.int64)  # -1: padding of the epoch's last batch
            chunk = order[position * batch : (position + 1) * batch]
            indices[: len(chunk)] = chunk
            indices = indices[self._local]
            mask = indices >= 0
            rng = np.random.default_rng([self._seed, _AUGMENT_STREAM, step])
            images, labels = self._pipeline.train_batch(np.where(mask, indices, 0), rng, self._local, batch)
            images[~mask], labels[~mask] = 0, 0
            yield {"image": images, "label": labels, "index": indices.astype(np.int32), "mask": mask}

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        """Batches from `start_step` on, bitwise equal to those an unbroken run yields there."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}.")
        return _prefetch(self._generate(start_step), self._prefetch)


def eval_batches(
    config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    train_split: bool = False,
) -> Iterator[Batch]:
    """The test split (or with `train_split`, the training split) once, in order, normalised, without augmentation.

    Every process yields the same number of batches (SPMD); the last global batch
    is padded to full size with 'mask' False on padding, so over all processes
    every test example appears exactly once with mask True. Fields: 'image'
    float32, 'label' int32, 'mask' bool.
    """
    spec = _spec(config)
    local = _process_slice(global_batch_size, process_index, process_count)
    pipeline = _pipeline(config, "train" if train_split else spec.test_split)

    def generate() -> Iterator[Batch]:
        num = len(pipeline)
        for start in range(0, num, global_batch_size):
            positions = start + np.arange(global_batch_size)[local]
            mask = positions < num
            images, labels = pipeline.eval_batch(positions[mask])
            yield {"image": _pad(images, mask.size), "label": _pad(labels, mask.size), "mask": mask}

    return _prefetch(generate(), config.data.prefetch)


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    """Zero-pads the leading axis of `x` to `size`."""
    if len(x) == size:
        return x
    out = np.zeros((size, *x.shape[1:]), x.dtype)
    out[: len(x)] = x
    return out


def to_global(batch: Batch, mesh: jax.sharding.Mesh, axis: str = data_parallel.AXIS) -> dict[str, jax.Array]:
    """Assembles the processes' local batches into global arrays sharded along `axis`."""
    if axis not in mesh.shape:
        raise ValueError(f"Mesh has no axis {axis!r}; its axes are {tuple(mesh.shape)}.")
    shards = mesh.shape[axis]
    sharding = NamedSharding(mesh, P(axis))
    out = {}
    for name, x in batch.items():
        global_size = len(x) * jax.process_count()
        if global_size % shards:
            raise ValueError(
                f"Global batch of {global_size} ({name!r}) is not divisible by the {shards} devices"
                f" along mesh axis {axis!r}; choose a batch size that is a multiple of {shards}."
            )
        out[name] = jax.make_array_from_process_local_data(sharding, x)
    return out
