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

Sources (`config.data.source`, each in `fgc_jax.data`): `cifar_bin` and `sklearn`
(digits) are read into memory once; `tfds` reads CIFAR into memory and ImageNet by
index; `imagenet_folder` reads extracted ImageNet files by index. ImageNet is decoded
per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
import dataclasses
import itertools
import math
import queue
import threading
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
from PIL import Image

from fgc_jax import data_parallel
from fgc_jax.data import cifar, common, digits, imagenet_folder, tfds_source

Batch = dict[str, np.ndarray]

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
    # The standard splits' sizes, for plans made without the data (`nominal_info`).
    num_train: int = 0
    num_test: int = 0


_SPECS = {
    "cifar10": _Spec(10, ("cifar_bin", "tfds"), "test", CIFAR10_MEAN, CIFAR10_STD, 4, True,
                     num_train=50_000, num_test=10_000),
    "cifar100": _Spec(100, ("cifar_bin", "tfds"), "test", CIFAR100_MEAN, CIFAR100_STD, 4, True,
                      num_train=50_000, num_test=10_000),
    "imagenet2012": _Spec(1000, ("tfds", "imagenet_folder"), "validation", IMAGENET_MEAN, IMAGENET_STD,
                          num_train=1_281_167, num_test=50_000),
    "digits": _Spec(10, ("sklearn",), "test", DIGITS_MEAN, DIGITS_STD, 1, False,
                    num_train=digits.NUM_TRAIN, num_test=digits.NUM_EXAMPLES - digits.NUM_TRAIN),
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
            " imagenet_folder: imagenet2012 only)."
        )
    if not isinstance(config.data.prefetch, int) or config.data.prefetch < 0:
        raise ValueError(f"config.data.prefetch must be an int >= 0, got {config.data.prefetch!r}.")
    if name == "imagenet2012" and config.data.image_size <= 0:
        raise ValueError(f"config.data.image_size must be positive, got {config.data.image_size}.")
    return spec


def _in_memory(config: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A whole split as (uint8 NHWC images, int32 labels), loaded once per process."""
    if config.data.source == "cifar_bin":
        return cifar.read(config, split)
    if config.data.source == "sklearn":
        return digits.read(split)
    return tfds_source.read(config.dataset, split, config.data.dir, config.data.manual_dir,
                            _SPECS[config.dataset].num_classes)


def check_labels(config: ml_collections.ConfigDict) -> None:
    """Checks the data before any training: loads both splits of an in-memory dataset (CIFAR,
    digits), checking every label; opens every file header of an ImageNet folder. tfds ImageNet's
    labels are checked as its batches are decoded."""
    if config.data.source == "imagenet_folder":
        imagenet_folder.check_headers(config.data.dir)
    elif config.dataset != "imagenet2012":
        for split in ("train", _spec(config).test_split):
            _in_memory(config, split)


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    """Validates `config` and the data's availability; cheap, so call it before compiling.

    For tfds ImageNet with `config.data.manual_dir` set, the first call prepares the
    array_record files (hours, once).
    """
    spec = _spec(config)
    name = config.dataset
    if config.data.source == "cifar_bin":
        num_train, num_test = (cifar.num_examples(config, split) for split in ("train", "test"))
    elif config.data.source == "sklearn":
        num_train, num_test = digits.NUM_TRAIN, digits.NUM_EXAMPLES - digits.NUM_TRAIN
    else:
        num_train, num_test = (len(_random_access(config, split)) for split in ("train", spec.test_split))
    shape, num_classes = input_spec(config)
    return DatasetInfo(name, num_train, num_test, num_classes, shape)


def nominal_info(config: ml_collections.ConfigDict, num_train: int | None = None) -> DatasetInfo:
    """`dataset_info` of the standard splits (or `num_train` training rows), without the data."""
    spec = _spec(config)
    shape, num_classes = input_spec(config)
    return DatasetInfo(config.dataset, spec.num_train if num_train is None else num_train,
                       spec.num_test, num_classes, shape)


def _random_access(config: ml_collections.ConfigDict, split: str) -> Sequence[Mapping[str, Any]]:
    """ImageNet's `split`, examples {'image': uint8 HWC, 'label'} read and decoded by index."""
    if config.data.source == "imagenet_folder":
        return imagenet_folder.ImageFolder(config.data.dir, split)
    return tfds_source.open_split(config.dataset, split, config.data.dir, config.data.manual_dir)


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

        list(common.pool().map(one, range(len(indices))))
        common.check_labels(labels, self._spec.num_classes, "imagenet2012")
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
        return _DecodedPipeline(_random_access(config, split), spec, config.data.image_size)
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
