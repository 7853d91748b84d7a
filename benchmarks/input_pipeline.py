"""Throughput of the input pipeline alone (reading, augmentation, normalisation, prefetch).

CIFAR-shaped data goes through the real cifar_bin path: ../shared/data/cifar10-mini
when present, else synthetic binary files. ImageNet-shaped data goes through the
real ImageNet augmentation path with the tfds reader replaced by synthetic
examples of typical ImageNet size (375x500), either as decoded arrays or as JPEG
bytes decoded with PIL per example (what tfds does without OpenCV).

With --imagenet_folder (an extracted ImageNet, e.g. the sample of
`python -m fgc_jax.data.imagenet_sample`), the 224-px training path of the folder route
(file read + JPEG decode + crop + resize + normalise) is timed with 1, 2, ... decoding threads
in one process (`--threads`), and as 1, 2, ... processes of one thread each (`--processes`:
independent loaders, as one host's processes would run, their images/s summed); and the share
of a decoding thread's time that holds Python's GIL, which bounds how far threads scale on a
host with many more cores than this one.

  python benchmarks/input_pipeline.py [--cifar_dir DIR] [--seconds 3] [--imagenet_folder DIR]
      [--threads 1,2] [--processes 1,2]
"""

import argparse
import concurrent.futures
import functools
import io
import itertools
import multiprocessing
import os
import pathlib
import tempfile
import threading
import time
from unittest import mock

import ml_collections
import numpy as np
from PIL import Image

from fgc_jax import input_pipeline
from fgc_jax.data import common, tfds_source

CIFAR_MINI = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-mini"
              / "cifar-10-batches-bin")
# Consumption of one training step on this 2-core machine (images/s); target is 5x.
STEP_RATE = {"cifar10": 300, "imagenet2012": 10}


def make_config(dataset, source, data_dir="", image_size=224):
    return ml_collections.ConfigDict({
        "dataset": dataset, "seed": 0,
        "data": {"source": source, "dir": str(data_dir), "manual_dir": "", "prefetch": 2,
                 "image_size": image_size, "download_url": "", "download_sha256": ""},
    })


def write_synthetic_cifar(directory):
    """Full-size synthetic CIFAR-10 binaries (50,000 train / 10,000 test records)."""
    rng = np.random.default_rng(0)
    for name, records in [(f"data_batch_{i}.bin", 10_000) for i in range(1, 6)] + [
        ("test_batch.bin", 10_000)]:
        data = rng.integers(0, 256, (records, 3073), dtype=np.uint8)
        data[:, 0] %= 10
        (directory / name).write_bytes(data.tobytes())


def synthetic_photos(count, height=375, width=500):
    """Smooth random images (upsampled noise), closer to photos than white noise."""
    rng = np.random.default_rng(0)
    photos = []
    for _ in range(count):
        small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))
        noise = rng.integers(-8, 9, image.shape)
        photos.append(np.clip(image.astype(np.int64) + noise, 0, 255).astype(np.uint8))
    return photos


class FakeImageNet:
    """Stands in for `tfds.data_source('imagenet2012')`: 1.28M examples by index."""

    def __init__(self, photos, jpeg):
        self._jpeg = jpeg
        if jpeg:
            self._items = []
            for photo in photos:
                buffer = io.BytesIO()
                Image.fromarray(photo).save(buffer, format="JPEG", quality=90)
                self._items.append(buffer.getvalue())
        else:
            self._items = photos

    def mean_bytes(self):
        return np.mean([len(item) for item in self._items])

    def __len__(self):
        return 1_281_167

    def __getitem__(self, index):
        item = self._items[index % len(self._items)]
        if self._jpeg:
            with Image.open(io.BytesIO(item)) as image:
                item = np.asarray(image)
        return {"image": item, "label": np.int64(index % 1000)}


def rate(make_batches, batch_size, seconds):
    """Images/s after one warm-up batch, over at least `seconds`; restarts finite iterators."""
    batches = itertools.chain.from_iterable(make_batches() for _ in itertools.count())
    next(batches)
    start, count = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < seconds or count < 3:
        next(batches)
        count += 1
    return count * batch_size / elapsed


def folder_rate(folder: str, threads: int, seconds: float) -> float:
    """Images/s of the folder route's 224-px training batches with `threads` decoding threads."""
    config = make_config("imagenet2012", "imagenet_folder", folder)
    with concurrent.futures.ThreadPoolExecutor(threads) as executor, \
            mock.patch.object(common, "pool", lambda: executor):
        loader = input_pipeline.TrainLoader(config, global_batch_size=64, process_index=0,
                                            process_count=1)
        return rate(loader.batches, 64, seconds)


def folder_rate_in_processes(folder: str, processes: int, seconds: float) -> float:
    """Summed images/s of `processes` one-thread loaders running at once."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as workers:
        return sum(workers.starmap(folder_rate, [(folder, 1, seconds)] * processes))


def gil_share(folder: str, seconds: float) -> float:
    """Fraction of the time one decoding thread holds the GIL: a pure-Python counter in another
    thread (on another core) slows by that fraction. Threads in one process stop scaling near
    1 / share; past that, processes (one per share of cores) would be needed."""
    def counted(work) -> float:
        stop, counts = threading.Event(), []

        def spin():
            n = 0
            while not stop.is_set():
                n += 1
            counts.append(n)

        spinner = threading.Thread(target=spin)
        start = time.perf_counter()
        spinner.start()
        work()
        stop.set()
        spinner.join()
        return counts[0] / (time.perf_counter() - start)

    alone = counted(lambda: time.sleep(seconds))
    beside_decoding = counted(lambda: folder_rate(folder, 1, seconds))
    return max(0.0, 1 - beside_decoding / alone)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar_dir", default=str(CIFAR_MINI))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--imagenet_folder", default="", help="extracted ImageNet (train/, val/)")
    parser.add_argument("--threads", default="1,2", help="decoding thread counts (folder route)")
    parser.add_argument("--processes", default="1,2", help="one-thread process counts (folder route)")
    args = parser.parse_args()
    rows = []

    with tempfile.TemporaryDirectory() as tmp:
        cifar_dir = pathlib.Path(args.cifar_dir)
        what = f"cifar_bin {cifar_dir.name}"
        if not cifar_dir.is_dir():
            cifar_dir, what = pathlib.Path(tmp), "cifar_bin synthetic"
            write_synthetic_cifar(cifar_dir)
        config = make_config("cifar10", "cifar_bin", cifar_dir)
        loader = input_pipeline.TrainLoader(config, global_batch_size=256, process_index=0,
                                            process_count=1)
        evals = functools.partial(input_pipeline.eval_batches, config, global_batch_size=256,
                                  process_index=0, process_count=1)
        rows.append(("cifar10", f"train, {what}", 256, rate(loader.batches, 256, args.seconds)))
        rows.append(("cifar10", f"eval, {what}", 256, rate(evals, 256, args.seconds)))

    photos = synthetic_photos(32)
    config = make_config("imagenet2012", "tfds")
    for jpeg in (False, True):
        source = FakeImageNet(photos, jpeg)
        what = f"JPEG ({source.mean_bytes() / 1e3:.0f} kB) + decode" if jpeg else "decoded"
        with mock.patch.object(tfds_source, "open_split", lambda *args: source):
            loader = input_pipeline.TrainLoader(config, global_batch_size=64, process_index=0,
                                                process_count=1)
            evals = functools.partial(input_pipeline.eval_batches, config, global_batch_size=64,
                                      process_index=0, process_count=1)
            rows.append(("imagenet2012", f"train 224, 375x500 {what}", 64,
                         rate(loader.batches, 64, args.seconds)))
            rows.append(("imagenet2012", f"eval 224, 375x500 {what}", 64, rate(evals, 64, args.seconds)))

    if args.imagenet_folder:
        for threads in map(int, args.threads.split(",")):
            rows.append(("imagenet2012", f"train 224, folder JPEG files, 1 process, {threads} thread(s)", 64,
                         folder_rate(args.imagenet_folder, threads, args.seconds)))
        share = gil_share(args.imagenet_folder, args.seconds)
        gil_line = (f"One decoding thread holds the GIL {100 * share:.0f}% of its time: threads in one "
                    f"process scale to about {1 / max(share, 1e-3):.0f} decoding threads.\n")
        for processes in map(int, args.processes.split(",")):
            rows.append(("imagenet2012", f"train 224, folder JPEG files, {processes} process(es) x 1 thread",
                         64, folder_rate_in_processes(args.imagenet_folder, processes, args.seconds)))

    print(f"Input pipeline throughput, {os.cpu_count()} CPU cores, prefetch 2 (images/s)\n")
    if args.imagenet_folder:
        print(gil_line)
    print("| dataset | path | batch | images/s | train step consumes | ratio |")
    print("|---|---|---|---|---|---|")
    for dataset, path, batch, value in rows:
        need = STEP_RATE[dataset]
        print(f"| {dataset} | {path} | {batch} | {value:,.0f} | {need} | {value / need:.0f}x |")


if __name__ == "__main__":
    main()
