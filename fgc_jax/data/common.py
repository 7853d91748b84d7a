"""What the data sources share: label checks, read-only caches, the decoding threads."""

from __future__ import annotations

import concurrent.futures
import functools
import os

import numpy as np


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raises ValueError naming `where` if a label lies outside [0, num_classes)."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"Labels in {where} span [{labels.min()}, {labels.max()}], outside [0, {num_classes});"
            " the files are corrupt or belong to another dataset (check config.dataset)."
        )


def frozen(x: np.ndarray) -> np.ndarray:
    """Marks a cached array read-only, so no caller can alter the shared copy."""
    x.flags.writeable = False
    return x


@functools.cache
def pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for decoding and per-example transforms (PIL and NumPy release the GIL)."""
    return concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1, "fgc_input")
