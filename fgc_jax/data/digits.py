"""scikit-learn's bundled 8x8 digits (`config.data.source='sklearn'`): the offline quickstart."""

from __future__ import annotations

import functools

import numpy as np

from fgc_jax.data.common import frozen

# The first 1,437 of scikit-learn's 1,797 images train, the last 360 test.
NUM_TRAIN = 1437
NUM_EXAMPLES = 1797


@functools.lru_cache(maxsize=2)
def read(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The digits of `split` as uint8 [N, 8, 8, 1] in 0..255 and int32 labels."""
    from sklearn.datasets import load_digits  # Here: only the quickstart needs scikit-learn.

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    part = slice(None, NUM_TRAIN) if split == "train" else slice(NUM_TRAIN, None)
    return frozen(images[part]), frozen(labels[part])
