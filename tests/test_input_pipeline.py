"""Input pipeline: crops, decoding, bad files, shipped data, TFDS (mocked) and determinism."""

import io
import logging
import math
import pickle

import jax
import ml_collections
import numpy as np
from PIL import Image
import psutil
import pytest
import skimage.data
import sklearn.datasets
import tensorflow_datasets as tfds

from mae_jax import config_lib
from mae_jax import input_pipeline as ip
from mae_jax.input_pipeline import decode


def _config(dataset, data_dir=None, **overrides) -> ml_collections.ConfigDict:
  c = config_lib.pretrain_config("vit_b").input
  c.dataset = dataset
  c.data_dir = data_dir
  c.batch_size = 8
  c.num_workers = 0
  c.update(overrides)
  return c


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _jpeg(array: np.ndarray, mode: str = "RGB", quality: int = 90) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).convert(mode).save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A TFDS data_dir in which the shipped datasets build themselves on first use."""
  return str(tmp_path_factory.mktemp("tfds"))


# ---------------------------------------------------------------------------------------------
# Pure pieces.

def test_random_resized_crop_box_stays_inside_and_in_range():
  rng = np.random.default_rng(0)
  areas, ratios = [], []
  for _ in range(2000):
    left, top, w, h = ip.random_resized_crop_box(rng, 500, 375, (0.2, 1.0), (3 / 4, 4 / 3))
    assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
    areas.append(w * h / (500 * 375))
    ratios.append(w / h)
  # Rounding to whole pixels moves the area and ratio a little past the bounds; large boxes
  # often do not fit (torchvision then draws again), which pulls the mean below 0.6.
  assert 0.19 < min(areas) < 0.25 and 0.9 < max(areas) <= 1.0 and 0.45 < np.mean(areas) < 0.55
  assert 0.74 < min(ratios) < 0.8 and 1.28 < max(ratios) < 1.34


def test_random_resized_crop_box_falls_back_to_the_centre_for_extreme_shapes():
  rng = np.random.default_rng(0)
  # A 1000x10 strip: no box of 20-100% area fits the ratio range; the fallback is centred.
  assert ip.random_resized_crop_box(rng, 1000, 10, (0.2, 1.0), (3 / 4, 4 / 3)) == (
      493, 0, 13, 10)


def test_normalize_is_imagenet_mean_std():
  images = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
  want = (images / 255.0 - np.array(ip.IMAGENET_MEAN)) / np.array(ip.IMAGENET_STD)
  got = ip.normalize(images)
  assert got.dtype == np.float32 and got.shape == images.shape
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_jpeg_dct_downscaled_decode_matches_full_decode():
  photo = skimage.data.astronaut()  # 512 x 512
  data = _jpeg(photo)
  box = lambda w, h: (64, 32, 384, 384)
  small = ip.decode_and_crop(data, 32, box)  # 384 / 32 = 12: decoded at 1/4 scale
  assert decode.dct_scale(box(512, 512), (32, 32)) == 4
  full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").crop((64, 32, 448, 416)).resize(
      (32, 32), Image.BICUBIC))  # the official crop of the full decode
  assert small.shape == (32, 32, 3) and small.dtype == np.uint8
  assert np.abs(small.astype(int) - full.astype(int)).mean() < 1.0


@pytest.mark.parametrize("size", [96, 160])
def test_resize_is_pils_antialiased_bicubic(size):
  """The official resize (PIL, antialiased bicubic) of the official crop, exactly."""
  photo = skimage.data.coffee()  # 400 x 600
  buffer = io.BytesIO()
  Image.fromarray(photo).save(buffer, format="PNG")  # lossless: no DCT-domain scaling
  rng = np.random.default_rng(0)
  for _ in range(8):
    box = ip.random_resized_crop_box(rng, 600, 400, (0.2, 1.0), (3 / 4, 4 / 3))
    ours = ip.decode_and_crop(buffer.getvalue(), size, lambda w, h: box)
    left, top, w, h = box
    official = np.asarray(Image.fromarray(photo).crop((left, top, left + w, top + h)).resize(
        (size, size), Image.BICUBIC))
    np.testing.assert_array_equal(ours, official)


# ---------------------------------------------------------------------------------------------
# An image folder holding every kind of bad file.

GOOD = ("cat/alpha.png", "cat/cmyk.jpg", "cat/gray.png", "cat/palette.png", "cat/rgb.jpg",
        "dog/gray.jpg", "dog/gray16.png", "dog/rgb.png")
BAD = ("dog/corrupt.jpg", "dog/empty.jpeg", "dog/text.png", "dog/truncated.jpg")


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  photo = np.asarray(Image.fromarray(skimage.data.chelsea()).resize((120, 80)))
  grey = photo.mean(-1).astype(np.uint8)
  for d in ("cat", "dog"):
    (root / d).mkdir()
  rgba = np.concatenate([photo, np.full(photo.shape[:2] + (1,), 128, np.uint8)], -1)
  Image.fromarray(rgba, "RGBA").save(root / "cat/alpha.png")
  (root / "cat/cmyk.jpg").write_bytes(_jpeg(photo, "CMYK"))
  Image.fromarray(grey, "L").save(root / "cat/gray.png")
  palette = Image.fromarray(photo).convert("P")
  palette.info["transparency"] = 0
  palette.save(root / "cat/palette.png", transparency=0)
  (root / "cat/rgb.jpg").write_bytes(_jpeg(photo))
  (root / "dog/gray.jpg").write_bytes(_jpeg(photo, "L"))
  Image.fromarray(grey.astype(np.uint16) * 257).save(root / "dog/gray16.png")
  Image.fromarray(photo).save(root / "dog/rgb.png")
  jpeg = _jpeg(photo)
  (root / "dog/truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
  (root / "dog/corrupt.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 8)
  (root / "dog/text.png").write_bytes(b"not an image\n")
  (root / "dog/empty.jpeg").write_bytes(b"")
  (root / "dog/notes.txt").write_text("ignored by its name")
  (root / "README.md").write_text("ignored: not in a class folder")
  return str(root)


def test_folder_bad_files_are_skipped_or_converted_and_counted(bad_folder, caplog):
  c = _config(f"folder:{bad_folder}", batch_size=4)
  caplog.set_level(logging.WARNING)
  assert ip.num_examples(c) == len(GOOD) + len(BAD)
  assert "ignored 2 files" in caplog.text
  # Training: three epochs of 12 records, the bad ones replaced by readable neighbours.
  before = ip.file_issue_counts()
  batches = _take(ip.create_iterator(c, image_size=16, seed=0, train=True), 9)
  for b in batches:
    assert b["image"].shape == (4, 16, 16, 3) and np.isfinite(b["image"]).all()
    assert set(b["label"]) <= {0, 1}
  counts = ip.file_issue_counts()
  for kind in (ip.SKIPPED, "CMYK image converted to RGB", "image with alpha: alpha dropped",
               "grayscale image converted to RGB", "16-bit grayscale image converted to RGB"):
    assert counts.get(kind, 0) > before.get(kind, 0), kind
  assert "truncated" in caplog.text and "CMYK" in caplog.text
  # One pass: bad files are invalid rows, every good one appears once with its label.
  batches = list(ip.create_iterator(c, image_size=16, seed=0, train=False, split="train",
                                    normalize=False))
  valid = np.concatenate([b["valid"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])
  names = sorted(GOOD + BAD)
  assert valid.tolist() == [n in GOOD for n in names]
  assert labels[valid].tolist() == [n.startswith("dog") for n in names if n in GOOD]
  grey = images[names.index("cat/gray.png")]
  assert images.dtype == np.uint8 and (grey[..., 0] == grey[..., 2]).all() and grey.std() > 10
  assert not images[~valid].any()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_folder_of_only_bad_files_fails_with_a_clear_error(tmp_path, workers):
  for i in range(3):
    (tmp_path / f"{i}.jpg").write_bytes(b"not a jpeg")
  c = _config(f"folder:{tmp_path}", num_workers=workers)
  iterator = ip.create_iterator(c, image_size=16, seed=0, train=True)
  with pytest.raises(RuntimeError, match="unreadable; the data is broken"):
    next(iterator)
  iterator.close()


def test_flat_folder_is_unlabeled_and_split_subfolders_are_used(tmp_path):
  photo = skimage.data.coffee()
  for split, n in (("train", 3), ("val", 2)):
    (tmp_path / split).mkdir()
    for i in range(n):
      (tmp_path / split / f"{i}.jpg").write_bytes(_jpeg(photo[i * 10:]))
  c = _config(f"folder:{tmp_path}")
  assert ip.num_examples(c) == 3 and ip.num_examples(c, "val") == 2
  batch = next(ip.create_iterator(c, image_size=16, seed=0, train=False))  # eval split: val
  assert set(batch) == {"image", "valid"} and batch["valid"].sum() == 2


# ---------------------------------------------------------------------------------------------
# Start-up errors say what is wrong and how to fix it.

def test_unprepared_imagenet_says_what_to_download_and_the_command(tmp_path):
  c = _config("imagenet2012", str(tmp_path), manual_dir="/data/ilsvrc")
  with pytest.raises(ValueError) as e:
    ip.validate(c)
  message = str(e.value)
  for part in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "/data/ilsvrc",
               f"tfds build imagenet2012 --manual_dir=/data/ilsvrc --data_dir={tmp_path} "
               "--file_format=array_record"):
    assert part in message


@pytest.mark.parametrize("overrides, field", [
    (dict(dataset="no_such_dataset_xyz"), "input.dataset"),
    (dict(dataset="folder:/no/such/folder"), "input.dataset"),
    (dict(batch_size=0), "input.batch_size"),
    (dict(crop_scale=(0.5, 0.2)), "input.crop_scale"),
    (dict(split="validation"), "input.split"),
    (dict(decoded_cache_mb=-1), "input.decoded_cache_mb"),
])
def test_bad_config_names_the_field(data_dir, overrides, field):
  c = _config("sklearn_digits", data_dir)
  c.update(overrides)
  with pytest.raises(ValueError, match=field):
    ip.validate(c)


def test_batch_must_split_over_processes(data_dir):
  with pytest.raises(ValueError, match="input.batch_size"):
    ip.create_iterator(_config("sklearn_digits", data_dir, batch_size=6), image_size=8, seed=0,
                       train=True, process_index=0, process_count=4)


# ---------------------------------------------------------------------------------------------
# The shipped data.

def test_skimage_photos_train_and_test(data_dir):
  c = _config("skimage_photos", data_dir)
  ip.validate(c)
  assert ip.num_examples(c) == 7 and ip.num_examples(c, "test") == 2
  assert ip.num_classes(c) is None
  batch = next(ip.create_iterator(c, image_size=32, seed=0, train=True))
  assert set(batch) == {"image"} and batch["image"].shape == (8, 32, 32, 3)
  assert batch["image"].dtype == np.float32 and abs(batch["image"].mean()) < 1.5
  held_out = list(ip.create_iterator(c, image_size=32, seed=0, train=False))
  assert len(held_out) == 1 and held_out[0]["valid"].tolist() == [True] * 2 + [False] * 6


def test_sklearn_digits_eval_counts_every_example_once(data_dir):
  c = _config("sklearn_digits", data_dir, batch_size=64)
  assert ip.num_examples(c) == 1437 and ip.num_classes(c) == 10
  batches = list(ip.create_iterator(c, image_size=16, seed=0, train=False))
  assert len(batches) == math.ceil(360 / 64)
  valid = np.concatenate([b["valid"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert valid.sum() == 360 and not valid[360:].any()
  source = ip.open_source(c, "test")
  assert labels[:360].tolist() == [source.read(i)[1] for i in range(360)]
  want = np.bincount(sklearn.datasets.load_digits().target[::5])
  np.testing.assert_array_equal(np.bincount(labels[:360]), want)


def test_digits_look_like_their_label(data_dir):
  """A nearest-class-mean classifier on the pipeline's images: far above chance (10%)."""
  c = _config("sklearn_digits", data_dir, batch_size=360, eval_crop_pct=1.0)
  test = next(ip.create_iterator(c, image_size=16, seed=0, train=False))
  train = next(ip.create_iterator(c, image_size=16, seed=0, train=True, augment="eval"))
  x, y = train["image"].reshape(360, -1), train["label"]
  means = np.stack([x[y == k].mean(0) for k in range(10)])
  d = ((test["image"].reshape(360, 1, -1) - means) ** 2).sum(-1)
  assert (d.argmin(1) == test["label"]).mean() > 0.8


def test_random_flip_off_keeps_every_training_crop_unmirrored(data_dir):
  """Full-image crops (scale and ratio 1) of square digits: with input.random_flip=False each
  training image is the evaluation resize of its record; with the default about half of them
  are that image mirrored."""
  c = _config("sklearn_digits", data_dir, batch_size=64, crop_scale=(1.0, 1.0),
              crop_ratio=(1.0, 1.0), eval_crop_pct=1.0, split="train")
  plain = next(ip.create_iterator(c, image_size=16, seed=0, train=True, augment="eval"))
  c.random_flip = False
  unflipped = next(ip.create_iterator(c, image_size=16, seed=0, train=True))
  np.testing.assert_array_equal(unflipped["label"], plain["label"])
  np.testing.assert_allclose(unflipped["image"], plain["image"], atol=1e-6)
  c.random_flip = True
  flipped = next(ip.create_iterator(c, image_size=16, seed=0, train=True))
  mirrored = [np.allclose(f, p[:, ::-1], atol=1e-6) and not np.allclose(f, p, atol=1e-6)
              for f, p in zip(flipped["image"], plain["image"])]
  same = [np.allclose(f, p, atol=1e-6) for f, p in zip(flipped["image"], plain["image"])]
  assert all(m or s for m, s in zip(mirrored, same))
  assert 16 <= sum(mirrored) <= 48


# ---------------------------------------------------------------------------------------------
# The global batch at step s is a pure function of (dataset, seed, s).

def _global_batches(c, start, steps, process_count, **kwargs):
  rows = [_take(ip.create_iterator(c, image_size=16, seed=3, train=True, start_step=start,
                                   process_index=p, process_count=process_count, **kwargs),
                steps) for p in range(process_count)]
  return [{k: np.concatenate([r[s][k] for r in rows]) for k in rows[0][s]} for s in range(steps)]


@pytest.mark.parametrize("dataset", ["sklearn_digits", "skimage_photos"])
def test_global_batch_same_for_1_2_4_processes_and_after_restart(data_dir, dataset):
  c = _config(dataset, data_dir)
  # Digits: steps 178-180 cross the first epoch boundary (1437 records); photos: every step does.
  start = 178 if dataset == "sklearn_digits" else 5
  one = _global_batches(c, start, 3, 1)
  for count in (2, 4):
    for a, b in zip(one, _global_batches(c, start, 3, count)):
      assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
  restarted = _global_batches(c, start + 1, 2, 1)
  for a, b in zip(one[1:], restarted):
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
  assert one[0]["image"].tobytes() != one[1]["image"].tobytes()
  other_seed = next(ip.create_iterator(c, image_size=16, seed=4, train=True, start_step=start))
  assert other_seed["image"].tobytes() != one[0]["image"].tobytes()


def test_epochs_visit_every_record_once(data_dir):
  c = _config("sklearn_digits", data_dir, batch_size=479)  # 3 steps = one epoch of 1437
  labels = np.concatenate([b["label"] for b in _take(
      ip.create_iterator(c, image_size=8, seed=0, train=True), 3)])
  want = np.bincount(sklearn.datasets.load_digits().target[np.arange(1797) % 5 != 0])
  np.testing.assert_array_equal(np.bincount(labels), want)


def test_worker_processes_give_the_same_batches(bad_folder):
  c = _config(f"folder:{bad_folder}", batch_size=4)
  want = _take(ip.create_iterator(c, image_size=16, seed=1, train=True, start_step=2), 5)
  c.num_workers = 2
  iterator = ip.create_iterator(c, image_size=16, seed=1, train=True, start_step=2)
  got = _take(iterator, 5)
  iterator.close()
  for a, b in zip(want, got):
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.mark.parametrize("workers", [0, 2])
def test_decoded_cache_gives_the_same_batches(bad_folder, workers):
  c = _config(f"folder:{bad_folder}", batch_size=4)
  want = _take(ip.create_iterator(c, image_size=16, seed=3, train=True), 8)
  c.update(dict(decoded_cache_mb=16, num_workers=workers))
  iterator = ip.create_iterator(c, image_size=16, seed=3, train=True)
  got = _take(iterator, 8)
  iterator.close()
  for a, b in zip(want, got):
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_decoded_cache_decodes_each_image_once_per_dct_scale(tmp_path, monkeypatch):
  photo = skimage.data.astronaut()
  for i in range(3):  # 96 x 64 JPEGs: crops to 16 px decode at DCT scale 1
    (tmp_path / f"{i}.jpg").write_bytes(_jpeg(photo[i * 50:i * 50 + 64, :96]))
  for i in range(2):
    Image.fromarray(photo[i * 70:i * 70 + 64, 100:196]).save(tmp_path / f"{i}.png")
  calls = []
  for module, name in ((decode.cv2, "imdecode"), (decode, "picture_pixels")):
    original = getattr(module, name)
    monkeypatch.setattr(module, name,
                        lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
  counts = {}
  for cache_mb in (0, 16):
    calls.clear()
    c = _config(f"folder:{tmp_path}", batch_size=4, decoded_cache_mb=cache_mb, prefetch=0)
    _take(ip.create_iterator(c, image_size=16, seed=0, train=True, augment="mae"), 10)
    counts[cache_mb] = len(calls)
  assert counts[0] == 40  # every example decoded
  assert counts[16] == 3 + 2  # each file decoded once


def test_decoded_cache_stays_within_its_budget_and_changes_no_output():
  photo = skimage.data.astronaut()  # 512 x 512: one decode is 768 KiB
  blobs = [_jpeg(np.roll(photo, 40 * i, axis=1)) for i in range(4)]

  class Blobs:  # the read() of a dataset source
    def read(self, index):
      return blobs[index], index

  budget = 1 << 20
  cache = ip.DecodedCache(budget)
  box = lambda w, h: (0, 0, w, h)  # the whole image at 32 px: DCT scale 4
  for _ in range(2):
    for i in range(4):
      data, label, decoded = cache.read(Blobs(), i)
      got = ip.decode_and_crop(data, 512, box, decoded=decoded)  # scale 1: 768 KiB
      cache.settle(i)
      assert label == i and cache.used <= budget
      assert got.tobytes() == ip.decode_and_crop(blobs[i], 512, box).tobytes()
      data, label, decoded = cache.read(Blobs(), i)
      got = ip.decode_and_crop(data, 32, box, decoded=decoded)  # scale 4: 48 KiB more
      cache.settle(i)
      assert cache.used <= budget
      assert got.tobytes() == ip.decode_and_crop(blobs[i], 32, box).tobytes()
  # The first image keeps both decodes; the others' full-size decodes never fit beside it, their
  # small ones do until the budget is spent.
  assert set(cache.entries[0][2]) == {1, 4}
  assert 1 <= len(cache.entries) < 4
  assert all(set(decoded) == {4} for i, (_, _, decoded) in cache.entries.items() if i)
  assert cache.used == sum(len(d) + sum(p.nbytes for p in dec.values())
                           for d, _, dec in cache.entries.values())


def test_a_dead_worker_stops_the_run_with_a_clear_error(bad_folder):
  iterator = ip.create_iterator(_config(f"folder:{bad_folder}", batch_size=4, num_workers=1),
                                image_size=16, seed=0, train=True)
  next(iterator)
  (worker,) = [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]
  worker.kill()
  with pytest.raises(RuntimeError, match="Input worker 0 died"):
    for _ in range(10):  # batches it finished before dying still arrive
      next(iterator)
  iterator.close()


def test_tfds_source_survives_pickling_for_worker_processes(data_dir):
  source = ip.open_source(_config("sklearn_digits", data_dir), "test")
  copy = pickle.loads(pickle.dumps(source))
  assert len(copy) == 360 and copy.read(7) == source.read(7)


# ---------------------------------------------------------------------------------------------
# Any TFDS dataset: imagenet2012 under tfds.testing.mock_data.

def test_imagenet2012_under_mock_data():
  c = _config("imagenet2012", eval_split="validation")
  with tfds.testing.mock_data(num_examples=20):
    ip.validate(c)
    assert ip.num_examples(c) == 20 and ip.num_classes(c) == 1000
    train = _take(ip.create_iterator(c, image_size=16, seed=0, train=True), 3)
    assert train[0]["image"].shape == (8, 16, 16, 3) and train[0]["label"].dtype == np.int32
    assert all(0 <= b["label"].min() and b["label"].max() < 1000 for b in train)
    evals = list(ip.create_iterator(c, image_size=16, seed=0, train=False))
  assert [b["valid"].sum() for b in evals] == [8, 8, 4]


def test_to_global_makes_sharded_global_arrays():
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, None,
                                                                         None))
  n = 2 * jax.device_count()
  batch = {"image": np.arange(n * 12, dtype=np.float32).reshape(n, 2, 2, 3),
           "label": np.arange(n, dtype=np.int32)}
  out = ip.to_global(batch, sharding)
  assert out["image"].shape == (n, 2, 2, 3) and out["label"].shape == (n,)
  np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])
  assert out["image"].sharding.spec[0] == "data"
