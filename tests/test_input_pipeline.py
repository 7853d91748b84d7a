"""Tests of fgc_jax.input_pipeline against facts independent of its code.

Facts used: the CIFAR-10 binary format and the cifar10-mini label counts (from
../shared/README.md), scikit-learn's digits, the normalisation constants of
FGC_SPEC.md §3, and tfds' mock data.
"""

import itertools
import shutil
import threading

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fgc_jax import input_pipeline
from fgc_jax.data import tfds_source

TRAIN_COUNTS = [517, 524, 490, 493, 537, 475, 503, 516, 529, 501]
TEST_COUNTS = [105, 93, 100, 104, 92, 87, 114, 102, 110, 110]
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR_STD = np.array([0.2023, 0.1994, 0.2010], np.float32)
MOCK_EXAMPLES = 48  # One size for every tfds mock, since loaded splits are cached.


def make_config(dataset="cifar10", source="cifar_bin", data_dir="", *, prefetch=2, seed=0,
                image_size=224, manual_dir=""):
    return ml_collections.ConfigDict({
        "dataset": dataset,
        "seed": seed,
        "data": {"source": source, "dir": str(data_dir), "manual_dir": manual_dir,
                 "prefetch": prefetch, "image_size": image_size, "download_url": "",
                 "download_sha256": ""},
    })


def read_records(path):
    """(labels, HWC uint8 images) of a CIFAR-10 binary file, validated by test_pixel_layout."""
    raw = np.frombuffer(path.read_bytes(), np.uint8).reshape(-1, 1 + 3072)
    return raw[:, 0], raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def read_train(directory):
    parts = [read_records(directory / f"data_batch_{i}.bin") for i in range(1, 6)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def to_uint8(images, mean, std):
    """Undoes (x/255 - mean)/std; exact for uint8 inputs."""
    return np.round((images * std + mean) * 255).astype(np.int64)


def match_crops(augmented, originals, pad, flips=(False, True)):
    """Per example, every (row offset, col offset, flipped) cutting it from the padded original."""
    n, h, w, _ = originals.shape
    padded = np.pad(originals, ((0, 0), (pad, pad), (pad, pad), (0, 0))).astype(np.int64)
    found = [[] for _ in range(n)]
    for dy, dx, flip in itertools.product(range(2 * pad + 1), range(2 * pad + 1), flips):
        crop = padded[:, dy:dy + h, dx:dx + w]
        if flip:
            crop = crop[:, :, ::-1]
        for i in np.flatnonzero((crop == augmented).all(axis=(1, 2, 3))):
            found[i].append((dy, dx, flip))
    return found


def take(iterator, n):
    batches = list(itertools.islice(iterator, n))
    iterator.close()
    return batches


# --------------------------------------------------------------------------- CIFAR-10 binary


def test_info_and_label_counts(cifar_mini_dir):
    config = make_config(data_dir=cifar_mini_dir)
    info = input_pipeline.dataset_info(config)
    assert info == input_pipeline.DatasetInfo("cifar10", 5085, 1017, 10, (32, 32, 3))
    # The parent of cifar-10-batches-bin works as well (the extracted archive's root).
    assert input_pipeline.dataset_info(make_config(data_dir=cifar_mini_dir.parent)) == info

    # 5085 = 113 * 45: one epoch of batch 45 visits every training example exactly once.
    loader = input_pipeline.TrainLoader(config, global_batch_size=45, process_index=0,
                                        process_count=1)
    assert loader.steps_per_epoch == 113
    epoch = take(loader.batches(), loader.steps_per_epoch)
    indices = np.concatenate([b["index"] for b in epoch])
    labels = np.concatenate([b["label"] for b in epoch])
    np.testing.assert_array_equal(np.sort(indices), np.arange(5085))
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), TRAIN_COUNTS)
    # 'index' is the record's position in data_batch_1..5, so its label byte matches.
    train_labels, _ = read_train(cifar_mini_dir)
    np.testing.assert_array_equal(labels, train_labels[indices])

    test = list(input_pipeline.eval_batches(config, global_batch_size=1017, process_index=0,
                                            process_count=1))
    assert len(test) == 1
    np.testing.assert_array_equal(np.bincount(test[0]["label"], minlength=10), TEST_COUNTS)
    names = (cifar_mini_dir / "batches.meta.txt").read_text().split()
    assert [names[label] for label in test[0]["label"][:2]] == ["cat", "ship"]


def test_pixel_layout_and_normalisation(cifar_mini_dir):
    config = make_config(data_dir=cifar_mini_dir)
    raw = (cifar_mini_dir / "test_batch.bin").read_bytes()
    record = np.frombuffer(raw, np.uint8, count=3073, offset=5 * 3073)  # The 6th test image.
    expected = np.empty((32, 32, 3), np.uint8)
    for row, col, channel in itertools.product(range(32), range(32), range(3)):
        expected[row, col, channel] = record[1 + 1024 * channel + 32 * row + col]

    batch = next(input_pipeline.eval_batches(config, global_batch_size=8, process_index=0,
                                             process_count=1))
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (8, 32, 32, 3)
    assert batch["label"][5] == record[0]
    np.testing.assert_allclose(batch["image"][5], (expected / 255 - CIFAR_MEAN) / CIFAR_STD,
                               atol=1e-5)
    # The helper the other tests use agrees with the byte-by-byte decoding.
    np.testing.assert_array_equal(read_records(cifar_mini_dir / "test_batch.bin")[1][5], expected)


def test_augmentation_is_padded_crop_and_flip(cifar_mini_dir):
    loader = input_pipeline.TrainLoader(make_config(data_dir=cifar_mini_dir),
                                        global_batch_size=256, process_index=0, process_count=1)
    _, train_images = read_train(cifar_mini_dir)
    matches = []
    for batch in take(loader.batches(), 2):
        pixels = to_uint8(batch["image"], CIFAR_MEAN, CIFAR_STD)
        assert pixels.min() >= 0 and pixels.max() <= 255
        matches += match_crops(pixels, train_images[batch["index"]], pad=4)
    assert all(matches), "every image is a shifted (maybe mirrored) copy within the zero pad"
    unique = [m[0] for m in matches if len(m) == 1]
    assert len(unique) > 450
    assert {dy for dy, _, _ in unique} == set(range(9))
    assert {dx for _, dx, _ in unique} == set(range(9))
    flipped = np.mean([flip for _, _, flip in unique])
    assert 0.4 < flipped < 0.6  # p = 0.5; 6 standard deviations for ~500 draws.


def test_every_epoch_visits_every_example_once(cifar_mini_dir):
    """5,085 examples at batch 256: 20 steps an epoch, the last one 221 examples + 35 padding."""
    loader = input_pipeline.TrainLoader(make_config(data_dir=cifar_mini_dir, prefetch=0),
                                        global_batch_size=256, process_index=0, process_count=1)
    assert loader.steps_per_epoch == 20
    batches = take(loader.batches(), 40)
    assert all(b["image"].shape == (256, 32, 32, 3) for b in batches)
    assert [int(b["mask"].sum()) for b in batches[:20]] == [256] * 19 + [221]
    for epoch in (batches[:20], batches[20:]):
        indices = np.concatenate([b["index"][b["mask"]] for b in epoch])
        np.testing.assert_array_equal(np.sort(indices), np.arange(5085))
        last = epoch[-1]
        assert (last["index"][~last["mask"]] == -1).all()
        assert not last["image"][~last["mask"]].any() and not last["label"][~last["mask"]].any()
    assert not np.array_equal(batches[0]["index"], batches[20]["index"])


def test_resume_is_bitwise_identical(cifar_mini_dir):
    config = make_config(data_dir=cifar_mini_dir)
    loader = input_pipeline.TrainLoader(config, global_batch_size=1000, process_index=0,
                                        process_count=1)
    reference = take(loader.batches(), 12)  # Epochs 0, 1 and part of 2.
    fresh = input_pipeline.TrainLoader(make_config(data_dir=cifar_mini_dir, prefetch=0),
                                       global_batch_size=1000, process_index=0, process_count=1)
    for start in (3, 7):  # Resumes that cross the epoch boundaries at steps 6 and 12.
        for want, got in zip(reference[start:], take(fresh.batches(start_step=start), 12 - start)):
            for key in ("image", "label", "index"):
                np.testing.assert_array_equal(want[key], got[key])
    other_seed = input_pipeline.TrainLoader(make_config(data_dir=cifar_mini_dir, seed=1),
                                            global_batch_size=1000, process_index=0,
                                            process_count=1)
    assert not np.array_equal(next(other_seed.batches())["index"], reference[0]["index"])


def test_processes_read_disjoint_slices_of_the_global_batch(cifar_mini_dir):
    config = make_config(data_dir=cifar_mini_dir)
    steps = 7  # Step 5 is the epoch's last batch (85 examples + padding); step 6 is in the next.
    whole = take(input_pipeline.TrainLoader(config, global_batch_size=1000, process_index=0,
                                            process_count=1).batches(), steps)
    parts = [
        take(input_pipeline.TrainLoader(config, global_batch_size=1000, process_index=p,
                                        process_count=2).batches(), steps)
        for p in (0, 1)
    ]
    for step in range(steps):
        first, second = parts[0][step], parts[1][step]
        assert first["image"].shape == (500, 32, 32, 3)
        assert not set(first["index"][first["mask"]]) & set(second["index"][second["mask"]])
        for key in ("image", "label", "index", "mask"):
            both = np.concatenate([first[key], second[key]])
            np.testing.assert_array_equal(both, whole[step][key])
    assert int(whole[5]["mask"].sum()) == 85 and not parts[1][5]["mask"].any()


def test_eval_pads_last_batch_and_covers_each_example_once(cifar_mini_dir):
    config = make_config(data_dir=cifar_mini_dir)
    labels, images = read_records(cifar_mini_dir / "test_batch.bin")
    whole = list(input_pipeline.eval_batches(config, global_batch_size=256, process_index=0,
                                             process_count=1))
    assert len(whole) == 4  # ceil(1017 / 256)
    assert all(b["image"].shape == (256, 32, 32, 3) and b["mask"].dtype == bool for b in whole)
    assert [int(b["mask"].sum()) for b in whole] == [256, 256, 256, 249]
    valid = lambda key: np.concatenate([b[key][b["mask"]] for b in whole])
    np.testing.assert_array_equal(valid("label"), labels)  # In file order.
    np.testing.assert_array_equal(to_uint8(valid("image"), CIFAR_MEAN, CIFAR_STD), images)

    parts = [list(input_pipeline.eval_batches(config, global_batch_size=256, process_index=p,
                                              process_count=2)) for p in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 4  # Same number of batches on every host.
    assert sum(int(b["mask"].sum()) for part in parts for b in part) == 1017
    for step in range(4):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(
                np.concatenate([parts[0][step][key], parts[1][step][key]]), whole[step][key])


def test_to_global_shards_the_batch():
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    batch = {"image": np.arange(16 * 2, dtype=np.float32).reshape(16, 2),
             "index": np.arange(16, dtype=np.int32), "mask": np.ones(16, bool)}
    out = input_pipeline.to_global(batch, mesh)
    for key, value in batch.items():
        assert out[key].shape == value.shape and out[key].dtype == value.dtype
        assert out[key].sharding.spec == jax.sharding.PartitionSpec("data")
        np.testing.assert_array_equal(np.asarray(out[key]), value)
    assert len(out["index"].addressable_shards) == jax.device_count() == 8


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("dataset, source, match", [
    ("mnist", "tfds", "Unknown config.dataset"),
    ("cifar10", "csv", "cannot serve"),
    ("cifar10", "sklearn", "sklearn: digits only"),
    ("digits", "cifar_bin", "cannot serve"),
    ("imagenet2012", "cifar_bin", r"use one of \[.tfds., .imagenet_folder.\]"),
])
def test_bad_dataset_or_source(dataset, source, match):
    with pytest.raises(ValueError, match=match):
        input_pipeline.dataset_info(make_config(dataset, source, "/nonexistent"))


def test_missing_data_explains_how_to_get_it(tmp_path):
    # (cifar_bin fetches missing data itself: tests/test_cifar_download.py)
    with pytest.raises(FileNotFoundError, match="tfds build cifar10 --file_format=array_record"):
        input_pipeline.dataset_info(make_config("cifar10", "tfds", tmp_path))
    with pytest.raises(FileNotFoundError, match="config.data.manual_dir"):
        input_pipeline.dataset_info(make_config("imagenet2012", "tfds", tmp_path))


def test_corrupt_files(cifar_mini_dir, tmp_path):
    truncated = tmp_path / "truncated"
    shutil.copytree(cifar_mini_dir, truncated)
    path = truncated / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"data_batch_3.bin .*truncated"):
        input_pipeline.dataset_info(make_config(data_dir=truncated))

    bad_label = tmp_path / "bad_label"
    shutil.copytree(cifar_mini_dir, bad_label)
    path = bad_label / "data_batch_2.bin"
    data = bytearray(path.read_bytes())
    data[3073 * 7] = 10  # Label byte of record 7: CIFAR-10 has labels 0..9.
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        input_pipeline.TrainLoader(make_config(data_dir=bad_label), global_batch_size=8,
                                   process_index=0, process_count=1)


def test_bad_batch_sizes(cifar_mini_dir):
    config = make_config(data_dir=cifar_mini_dir)
    with pytest.raises(ValueError, match="multiple of the process count"):
        input_pipeline.TrainLoader(config, global_batch_size=10, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="multiple of the process count"):
        input_pipeline.eval_batches(config, global_batch_size=10, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="exceeds the 5085 training examples"):
        input_pipeline.TrainLoader(config, global_batch_size=8192, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="process_index=2"):
        input_pipeline.TrainLoader(config, global_batch_size=8, process_index=2, process_count=2)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        input_pipeline.to_global({"label": np.zeros(12, np.int32)}, mesh)
    with pytest.raises(ValueError, match="no axis 'batch'"):
        input_pipeline.to_global({"label": np.zeros(16, np.int32)}, mesh, axis="batch")


# --------------------------------------------------------------------------- tfds (mocked)


def test_tfds_cifar10_mock():
    config = make_config("cifar10", "tfds")
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        info = input_pipeline.dataset_info(config)
        loader = input_pipeline.TrainLoader(config, global_batch_size=16, process_index=0,
                                            process_count=1)
        test = list(input_pipeline.eval_batches(config, global_batch_size=20, process_index=0,
                                                process_count=1))
    assert info == input_pipeline.DatasetInfo("cifar10", MOCK_EXAMPLES, MOCK_EXAMPLES, 10,
                                              (32, 32, 3))
    epoch = take(loader.batches(), loader.steps_per_epoch)
    for batch in epoch:
        assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == batch["index"].dtype == np.int32
        assert ((0 <= batch["label"]) & (batch["label"] < 10)).all()
    np.testing.assert_array_equal(np.sort(np.concatenate([b["index"] for b in epoch])),
                                  np.arange(MOCK_EXAMPLES))
    assert [int(b["mask"].sum()) for b in test] == [20, 20, 8]


def test_tfds_imagenet_mock():
    config = make_config("imagenet2012", "tfds", image_size=32)
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        info = input_pipeline.dataset_info(config)
        loader = input_pipeline.TrainLoader(config, global_batch_size=8, process_index=0,
                                            process_count=1)
        first = take(loader.batches(), 3)
        resumed = take(loader.batches(start_step=2), 1)[0]
        second_host = take(input_pipeline.TrainLoader(
            config, global_batch_size=8, process_index=1, process_count=2).batches(), 1)[0]
        test = list(input_pipeline.eval_batches(config, global_batch_size=40, process_index=0,
                                                process_count=1))
    assert info == input_pipeline.DatasetInfo("imagenet2012", MOCK_EXAMPLES, MOCK_EXAMPLES,
                                              1000, (32, 32, 3))
    assert first[0]["image"].shape == (8, 32, 32, 3) and first[0]["image"].dtype == np.float32
    assert np.isfinite(first[0]["image"]).all()
    for key in ("image", "label", "index"):
        np.testing.assert_array_equal(resumed[key], first[2][key])
        np.testing.assert_array_equal(second_host[key], first[0][key][4:])
    assert [b["image"].shape for b in test] == [(40, 32, 32, 3)] * 2
    assert [int(b["mask"].sum()) for b in test] == [40, 8]
    assert (test[1]["image"][8:] == 0).all()


def test_random_crop_box_stays_inside_with_inception_ranges():
    rng = np.random.default_rng(0)
    for height, width in [(375, 500), (500, 333), (64, 640), (17, 47)]:
        for _ in range(200):
            left, top, right, bottom = input_pipeline._random_crop_box(height, width,
                                                                       rng.random((10, 4)))
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            w, h = right - left, bottom - top
            if (w, h) != (width, height):
                assert 3 / 4 * 0.9 < w / h < 4 / 3 * 1.1


# --------------------------------------------------------------------------- digits


def test_digits_offline():
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
    mean, std = 0.3054, 0.3753  # The stated constants.
    config = make_config("digits", "sklearn")
    assert input_pipeline.dataset_info(config) == input_pipeline.DatasetInfo(
        "digits", 1437, 360, 10, (8, 8, 1))

    test = list(input_pipeline.eval_batches(config, global_batch_size=360, process_index=0,
                                            process_count=1))[0]
    np.testing.assert_array_equal(test["label"], digits.target[1437:])
    np.testing.assert_allclose(test["image"], (pixels[1437:] / 255 - mean) / std, atol=1e-5)

    loader = input_pipeline.TrainLoader(config, global_batch_size=479, process_index=0,
                                        process_count=1)  # 1437 = 3 * 479.
    epoch = take(loader.batches(), 3)
    indices = np.concatenate([b["index"] for b in epoch])
    np.testing.assert_array_equal(np.sort(indices), np.arange(1437))
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in epoch]),
                                  digits.target[indices])
    # The constants are the train split's statistics: unaugmented, it normalises to 0 +- 1.
    normalised = (pixels[:1437] / 255 - mean) / std
    assert abs(normalised.mean()) < 1e-3 and abs(normalised.std() - 1) < 1e-3
    # Augmented: shifted copies within the 1-pixel zero pad, never mirrored.
    augmented = np.concatenate([to_uint8(b["image"], mean, std) for b in epoch])
    matches = match_crops(augmented, pixels[indices], pad=1, flips=(False,))
    assert all(matches)
    assert {m[0][:2] for m in matches if len(m) == 1} == set(itertools.product(range(3), repeat=2))


def test_errors_in_the_prefetch_thread_reach_the_consumer(monkeypatch):
    image = np.zeros((40, 50, 3), np.uint8)
    source = [{"image": image, "label": np.int64(label)} for label in (1, 999, 1000, 2)]
    monkeypatch.setattr(tfds_source, "open_split", lambda *args: source)
    config = make_config("imagenet2012", "tfds", image_size=16)
    batches = input_pipeline.TrainLoader(config, global_batch_size=4, process_index=0,
                                         process_count=1).batches()
    with pytest.raises(ValueError, match=r"outside \[0, 1000\)"):
        next(batches)
    batches.close()
    assert not [t for t in threading.enumerate() if t.name == "fgc_prefetch"]
