"""ImageNet in the formats a user has: the sample writer, the extracted-folder route, its errors.

Oracles: tfds's own imagenet2012 label files (synset order, validation labels), the
sizes and modes the sample writer was asked for, PIL's reading of the written files,
and the CIFAR photographs the sample was made from.
"""

import itertools
import shutil

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import resnet18_imagenet
from conftest import CIFAR_MINI, GCS_BUCKET
from fgc_jax import config_check, input_pipeline, storage
from fgc_jax.data import imagenet_folder, imagenet_sample, tfds_source

TFDS_LABELS = tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()
TFDS_VAL_LABELS = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt").read_text().split()


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The real-format sample (both layouts), written once for the module."""
    if not CIFAR_MINI.is_dir():
        pytest.skip(f"{CIFAR_MINI} not found (../shared is absent)")
    out = tmp_path_factory.mktemp("imagenet_sample")
    sizes = imagenet_sample.write(CIFAR_MINI, out)
    return out, sizes


def folder_config(root, image_size=32, prefetch=2):
    return ml_collections.ConfigDict({
        "dataset": "imagenet2012", "seed": 0,
        "data": {"source": "imagenet_folder", "dir": str(root), "manual_dir": "",
                 "prefetch": prefetch, "image_size": image_size},
    })


def copy_folder(sample, tmp_path):
    root = tmp_path / "folder"
    shutil.copytree(sample[0] / "folder", root)
    return root


def test_sample_has_the_real_formats_and_quirks(sample):
    out, sizes = sample
    folder = out / "folder"
    assert (out / "tars" / "ILSVRC2012_img_train.tar").is_file()
    assert (out / "tars" / "ILSVRC2012_img_val.tar").is_file()
    # Val image N is in the folder tfds's validation label file gives for line N.
    for n in range(1, sizes["validation"] + 1):
        assert (folder / "val" / TFDS_VAL_LABELS[n - 1] / f"ILSVRC2012_val_{n:08d}.JPEG").is_file()
    modes = {}
    for path in sorted((folder / "train").rglob("*.JPEG")):
        with Image.open(path) as image:
            modes[path.name] = (image.format, image.mode, image.size[::-1])
            if modes[path.name][2] not in (imagenet_sample.SMALL_SIZE, imagenet_sample.ELONGATED_SIZE):
                assert 100 <= min(image.size) and max(image.size) <= 500
                assert image.size[0] != image.size[1]
    assert modes[imagenet_sample.CMYK_NAME][:2] == ("JPEG", "CMYK")
    assert modes[imagenet_sample.PNG_NAME][0] == "PNG"
    assert ("JPEG", "L") in {m[:2] for m in modes.values()}
    shapes = {m[2] for m in modes.values()}
    assert imagenet_sample.SMALL_SIZE in shapes and imagenet_sample.ELONGATED_SIZE in shapes


def test_folder_route_reads_every_quirk_with_tfds_labels(sample):
    out, sizes = sample
    config = folder_config(out / "folder")
    info = input_pipeline.dataset_info(config)
    assert info == input_pipeline.DatasetInfo("imagenet2012", sizes["train"], sizes["validation"],
                                              1000, (32, 32, 3))
    input_pipeline.check_labels(config)  # every header opens
    train = imagenet_folder.ImageFolder(out / "folder", "train")
    assert list(train.paths) == sorted(train.paths)  # stable index: sorted paths
    for k, path in enumerate(train.paths):
        example = train[k]
        synset = path.split("/")[-2]
        assert example["label"] == TFDS_LABELS.index(synset)
        with Image.open(path) as original:
            assert example["image"].shape == (*original.size[::-1], 3)
            assert example["image"].dtype == np.uint8
            if original.mode == "L":  # grayscale -> three equal channels
                gray = np.asarray(original)
                for c in range(3):
                    np.testing.assert_array_equal(example["image"][..., c], gray)
    val = imagenet_folder.ImageFolder(out / "folder", "validation")
    labels = {p.split("/")[-1]: int(val[k]["label"]) for k, p in enumerate(val.paths)}
    assert labels == {f"ILSVRC2012_val_{n:08d}.JPEG": TFDS_LABELS.index(TFDS_VAL_LABELS[n - 1])
                      for n in range(1, sizes["validation"] + 1)}


def test_cmyk_jpeg_decodes_to_the_picture_it_holds(sample, tmp_path):
    """The CMYK file, converted to RGB, is the RGB picture it was made from (JPEG noise aside)."""
    rgb = np.random.default_rng(0).integers(0, 256, (12, 16, 3), np.uint8)
    picture = Image.fromarray(rgb).resize((160, 120), Image.Resampling.BICUBIC)
    picture.convert("CMYK").save(tmp_path / "cmyk.JPEG", quality=95)
    decoded = imagenet_folder.decode(str(tmp_path / "cmyk.JPEG")).astype(np.float64)
    assert np.abs(decoded - np.asarray(picture)).mean() < 6


def test_folder_batches_are_finite_cover_every_example_and_resume_bitwise(sample):
    out, sizes = sample
    config = folder_config(out / "folder")
    loader = input_pipeline.TrainLoader(config, global_batch_size=16, process_index=0, process_count=1)
    first = list(itertools.islice(loader.batches(), loader.steps_per_epoch + 1))
    resumed = next(loader.batches(start_step=loader.steps_per_epoch))
    for key in ("image", "label", "index", "mask"):
        np.testing.assert_array_equal(resumed[key], first[-1][key])
    epoch = first[:-1]
    indices = np.concatenate([b["index"][b["mask"]] for b in epoch])
    np.testing.assert_array_equal(np.sort(indices), np.arange(sizes["train"]))
    assert all(np.isfinite(b["image"]).all() and b["image"].shape == (16, 32, 32, 3) for b in epoch)
    train = imagenet_folder.ImageFolder(out / "folder", "train")
    np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in epoch]),
                                  train.labels[indices])
    test = list(input_pipeline.eval_batches(config, global_batch_size=16, process_index=0,
                                            process_count=1))
    assert [int(b["mask"].sum()) for b in test] == [16, sizes["validation"] - 16]


@pytest.mark.parametrize("damage, message", [
    ("no_dir", r"config.data.source='imagenet_folder' needs config.data.dir"),
    ("missing", r"ImageNet train folder .*/folder/train not found"),
    ("flat_val", r"val folder .* holds 24 images outside synset folders .*valprep"),
    ("no_classes", r"train folder .* has no synset sub-folders"),
    ("unknown_synset", r"/train/cats is not an ImageNet-1k synset id"),
    ("empty_class", r"class folder .*/train/n01440764 holds no images"),
])
def test_layout_errors_name_what_and_where(sample, tmp_path, damage, message):
    root = copy_folder(sample, tmp_path)
    if damage == "missing":
        shutil.rmtree(root / "train")
    elif damage == "flat_val":
        for path in list((root / "val").rglob("*.JPEG")):
            path.rename(root / "val" / path.name)
        for synset in list((root / "val").iterdir()):
            if synset.is_dir():
                synset.rmdir()
    elif damage == "no_classes":
        shutil.rmtree(root / "train")
        (root / "train").mkdir()
    elif damage == "unknown_synset":
        (root / "train" / "cats").mkdir()
    elif damage == "empty_class":
        (root / "train" / "n01440764").mkdir()
    config = folder_config("" if damage == "no_dir" else root)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        input_pipeline.dataset_info(config)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\xff\xd8\xff\xe0garbage"])
def test_undecodable_file_is_named_before_training_and_by_the_scan(sample, tmp_path, content,
                                                                   capsys):
    root = copy_folder(sample, tmp_path)
    bad = sorted((root / "train").rglob("*.JPEG"))[5]
    bad.write_bytes(content)
    with pytest.raises(imagenet_folder.UndecodableImageError, match=f"1 ImageNet file.*{bad}"):
        input_pipeline.check_labels(folder_config(root))
    assert imagenet_folder.main([f"--dir={root}"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(bad) in err[0]


def test_truncated_jpeg_passes_the_header_check_and_fails_the_scan_naming_it(sample, tmp_path,
                                                                              capsys):
    root = copy_folder(sample, tmp_path)
    bad = sorted((root / "train").rglob("*.JPEG"))[3]
    bad.write_bytes(bad.read_bytes()[:-2000])  # the header stays, the picture is cut short
    input_pipeline.check_labels(folder_config(root))  # the header is intact
    assert imagenet_folder.main([f"--dir={root}"]) == 1
    assert str(bad) in capsys.readouterr().err
    train = imagenet_folder.ImageFolder(root, "train")
    with pytest.raises(imagenet_folder.UndecodableImageError, match=str(bad)):
        train[train.paths.index(str(bad))]


# --------------------------------------------------------------------------- tfds route


def tfds_config(tars, data_dir, image_size=32):
    config = folder_config("", image_size)
    config.data.source, config.data.dir, config.data.manual_dir = "tfds", str(data_dir), str(tars)
    return config


@pytest.fixture(scope="module")
def prepared(sample, tmp_path_factory):
    """The sample's tars prepared once by tfds's own imagenet2012 builder (needs the `imagenet`
    extra): the tfds data_dir."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("importlib_resources")
    data_dir = tmp_path_factory.mktemp("tfds")
    input_pipeline.dataset_info(tfds_config(sample[0] / "tars", data_dir))
    return data_dir


def test_tfds_builder_prepares_the_tars_and_agrees_with_the_folder_route(sample, prepared):
    """The array_record that tfds's builder wrote is read by index: labels and pictures as the
    folders give them."""
    out, sizes = sample
    info = input_pipeline.dataset_info(tfds_config("", prepared))
    assert (info.num_train, info.num_test) == (sizes["train"], sizes["validation"])
    for split in ("train", "validation"):
        examples = tfds.data_source("imagenet2012", split=split, data_dir=str(prepared))
        folder = imagenet_folder.ImageFolder(out / "folder", split)
        by_name = {p.split("/")[-1]: k for k, p in enumerate(folder.paths)}
        for k in range(len(examples)):
            example = examples[k]
            mine = folder[by_name[example["file_name"].decode()]]
            assert example["label"] == mine["label"]
            assert example["image"].shape == mine["image"].shape
            # Decoders differ in the last bits; tfds re-encodes the CMYK and PNG files as JPEG.
            assert np.abs(example["image"].astype(float) - mine["image"]).mean() < 4
    # Without manual_dir the prepared data is read as it is (no TensorFlow needed for reading).
    batch = next(input_pipeline.TrainLoader(tfds_config("", prepared), global_batch_size=16,
                                            process_index=0, process_count=1).batches())
    assert batch["image"].shape == (16, 32, 32, 3) and np.isfinite(batch["image"]).all()


def test_prepared_data_on_cloud_storage_is_read_as_from_the_local_disk(sample, prepared, gcs_emulator):
    """A pod's route: prepared once, copied to a bucket, read by every host from gs:// through
    array_record's own Cloud Storage client (fake-gcs-server on 127.0.0.1): the same examples
    and batches as the local copy. Preparing into gs:// and the folder route on gs:// are
    refused with one line before any work."""
    bucket = storage.gcs_client(f"gs://{GCS_BUCKET}", "test").bucket(GCS_BUCKET)
    for f in prepared.rglob("*"):
        if f.is_file():
            bucket.blob(f"tfds/{f.relative_to(prepared)}").upload_from_filename(f)
    remote, local = tfds_config("", f"gs://{GCS_BUCKET}/tfds"), tfds_config("", prepared)
    assert input_pipeline.dataset_info(remote) == input_pipeline.dataset_info(local)
    for split in ("train", "validation"):
        a = tfds.data_source("imagenet2012", split=split, data_dir=f"gs://{GCS_BUCKET}/tfds")
        b = tfds.data_source("imagenet2012", split=split, data_dir=str(prepared))
        for k in (0, len(b) - 1):
            assert a[k]["file_name"] == b[k]["file_name"] and np.array_equal(a[k]["image"], b[k]["image"])
    batches = [next(input_pipeline.TrainLoader(c, global_batch_size=16, process_index=0,
                                               process_count=1).batches()) for c in (remote, local)]
    for key in batches[1]:
        np.testing.assert_array_equal(batches[0][key], batches[1][key])

    with pytest.raises(ValueError, match=r"tfds writes array_record files to a local disk only.*"
                       r"gcloud storage cp -r LOCAL_DIR/imagenet2012 gs://fgc-test/prepare/"):
        input_pipeline.dataset_info(tfds_config(sample[0] / "tars", f"gs://{GCS_BUCKET}/prepare"))
    assert not list(bucket.list_blobs(prefix="prepare/"))
    config = resnet18_imagenet.get_config()
    config.data.source, config.data.dir = "imagenet_folder", f"gs://{GCS_BUCKET}/folder"
    with pytest.raises(config_check.ConfigError, match=r"config.data.dir=gs://fgc-test/folder: config.data."
                       r"source='imagenet_folder' reads local files; copy them to a local disk"):
        config_check.check_fields(config)
    config.data.source, config.data.dir = "tfds", "gs://fgc-no-such-bucket/tfds"
    with pytest.raises(storage.StorageError, match=r"config.data.dir=gs://fgc-no-such-bucket/tfds: the "
                       r"bucket gs://fgc-no-such-bucket does not exist"):
        config_check.check_fields(config)


@pytest.mark.parametrize("damage, message", [
    ("no_val_tar", r"manual_dir=.*tars lacks ILSVRC2012_img_val.tar; put both ILSVRC2012 tars"),
    ("no_tensorflow", r"needs fgc_jax_no_such_module: pip install -e '.\[imagenet\]'"),
    ("two_processes", r"each of the 2 processes would prepare it at once; prepare it once.*tfds build"),
])
def test_tfds_preparation_problems_are_one_line_before_any_work(sample, tmp_path, monkeypatch,
                                                               damage, message):
    tars = tmp_path / "tars"
    shutil.copytree(sample[0] / "tars", tars)
    if damage == "no_val_tar":
        (tars / "ILSVRC2012_img_val.tar").unlink()
    elif damage == "no_tensorflow":
        monkeypatch.setattr(tfds_source, "PREPARATION_MODULES", ("fgc_jax_no_such_module",))
    else:
        monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        input_pipeline.dataset_info(tfds_config(tars, tmp_path / "tfds"))
    assert not (tmp_path / "tfds").exists() or not any((tmp_path / "tfds").rglob("*.array_record*"))
