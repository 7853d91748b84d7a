"""Cost of the checkpoint fingerprints (`fgc_jax.checkpointing.fingerprints`) on one device.

    python benchmarks/fingerprint.py --rows 200000 --dim 512 --repeats 5

Times the fingerprint (two 32-bit sums + a NaN/inf test per array) of two memory banks of
`rows x dim` float32, the check a save and a restore each run once, against writing and
reading the same bytes with NumPy (`np.save` / `np.load` in a temporary directory) as the
scale of a checkpoint's own I/O. Prints GB/s; the README extrapolates to ImageNet.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from fgc_jax import checkpointing


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    banks = {name: jax.device_put(rng.standard_normal((args.rows, args.dim), np.float32))
             for name in ("feature", "gate")}
    nbytes = sum(b.nbytes for b in banks.values())
    checkpointing.fingerprints(banks)  # compile
    fingerprint = _median_seconds(lambda: checkpointing.fingerprints(banks), args.repeats)
    host = {k: np.asarray(v) for k, v in banks.items()}
    with tempfile.TemporaryDirectory() as tmp:
        def write():
            for k, v in host.items():
                with open(os.path.join(tmp, k + ".npy"), "wb") as f:
                    np.save(f, v)
                    f.flush()
                    os.fsync(f.fileno())
        write_s = _median_seconds(write, args.repeats)
        read_s = _median_seconds(lambda: [np.load(os.path.join(tmp, k + ".npy")) for k in host],
                                 args.repeats)
    gb = nbytes / 1e9
    print(f"{jax.devices()[0].platform}, 2 banks of {args.rows:,} x {args.dim} float32 = {gb:.3f} GB")
    print(f"fingerprint: {1e3 * fingerprint:.1f} ms ({gb / fingerprint:.2f} GB/s)")
    print(f"np.save+fsync: {1e3 * write_s:.1f} ms ({gb / write_s:.2f} GB/s); "
          f"np.load: {1e3 * read_s:.1f} ms ({gb / read_s:.2f} GB/s)")


if __name__ == "__main__":
    main()
