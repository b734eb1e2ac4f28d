"""Crops of any source size as the official transforms make them; files of any channel count."""

import io

import numpy as np
import pytest
import skimage.data
import tifffile
from PIL import Image

from mae_jax.input_pipeline import decode
from mae_jax.input_pipeline import file_issue_counts, random_resized_crop_box

# Source sizes (width, height) that users' folders and ImageNet hold, tiny ones included.
SOURCES = [(20, 13), (13, 20), (37, 50), (64, 48), (100, 300), (256, 256), (257, 256),
           (500, 375), (375, 500), (1000, 700)]


def _official_eval(image: Image.Image, size: int, crop_pct: float) -> np.ndarray:
  """torchvision's Resize(int(size / crop_pct), BICUBIC) + CenterCrop(size) on a PIL image,
  written out from torchvision's rules (torchvision itself is not installed here)."""
  short_target = int(size / crop_pct)
  w, h = image.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = short_target, int(short_target * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  image = image.resize((new_w, new_h), Image.BICUBIC)
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  return np.asarray(image.crop((left, top, left + size, top + size)))


def _official_train(image: Image.Image, box, size) -> np.ndarray:
  """torchvision's resized_crop on a PIL image: crop the box, then resize (BICUBIC)."""
  left, top, w, h = box
  return np.asarray(image.crop((left, top, left + w, top + h)).resize(size[::-1], Image.BICUBIC))


def _photo(width, height):
  return np.asarray(Image.fromarray(skimage.data.coffee()).resize((width, height),
                                                                   Image.BICUBIC))


@pytest.mark.parametrize("width,height", SOURCES)
@pytest.mark.parametrize("size", [32, 224])
def test_evaluation_crop_is_the_official_one_at_any_source_size(width, height, size):
  pixels = _photo(width, height)
  ours = decode.eval_resize_and_crop(pixels, (size, size), 0.875)
  np.testing.assert_array_equal(ours, _official_eval(Image.fromarray(pixels), size, 0.875))


@pytest.mark.parametrize("width,height", SOURCES)
@pytest.mark.parametrize("size", [(32, 32), (224, 224), (48, 64)])
def test_training_crop_is_the_official_one_at_any_source_size(width, height, size):
  pixels = _photo(width, height)
  rng = np.random.default_rng(width * height)
  for _ in range(3):
    box = random_resized_crop_box(rng, width, height, (0.08, 1.0), (3 / 4, 4 / 3))
    np.testing.assert_array_equal(decode.crop_and_resize(pixels, box, size),
                                  _official_train(Image.fromarray(pixels), box, size))


@pytest.mark.parametrize("width,height,size", [(20, 13, (48, 64)), (640, 400, (48, 64)),
                                               (400, 640, (64, 48)), (300, 100, (16, 96))])
def test_non_square_evaluation_covers_the_size_keeping_the_aspect(width, height, size):
  h, w = decode.eval_resize_shape(width, height, size, 0.875)
  cover = int(size[0] / 0.875), int(size[1] / 0.875)
  assert h >= cover[0] and w >= cover[1] and (h == cover[0] or w == cover[1])
  assert abs(w / h - width / height) < 2 / min(h, w)  # the aspect kept, up to rounding
  out = decode.eval_resize_and_crop(_photo(width, height), size, 0.875)
  assert out.shape == (*size, 3)


def test_square_sizes_resize_the_shorter_side_as_torchvision_does():
  assert decode.eval_resize_shape(500, 375, (224, 224), 0.875) == (256, 341)
  assert decode.eval_resize_shape(375, 500, (224, 224), 0.875) == (341, 256)
  assert decode.eval_resize_shape(20, 13, (32, 32), 0.875) == (36, 55)


def test_bands_are_resized_each_as_pil_resizes_a_float_image():
  rng = np.random.default_rng(0)
  bands = rng.uniform(0, 4000, (30, 41, 5)).astype(np.float32)
  out = decode.crop_and_resize(bands, (3, 2, 30, 25), (16, 24))
  assert out.shape == (16, 24, 5) and out.dtype == np.float32
  for c in range(5):
    ref = Image.fromarray(bands[2:27, 3:33, c], "F").resize((24, 16), Image.BICUBIC)
    np.testing.assert_array_equal(out[..., c], np.asarray(ref))
  grey = rng.integers(0, 256, (30, 41, 1), dtype=np.uint8)
  np.testing.assert_array_equal(decode.resize(grey, 12, 20)[..., 0], np.asarray(
      Image.fromarray(grey[..., 0]).resize((20, 12), Image.BICUBIC)))


def _npy(array):
  f = io.BytesIO()
  np.save(f, array)
  return f.getvalue()


def _tif(array):
  f = io.BytesIO()
  tifffile.imwrite(f, array, photometric="minisblack", planarconfig="contig")
  return f.getvalue()


@pytest.mark.parametrize("encode", [_npy, _tif])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
def test_arrays_read_as_height_width_bands_keeping_uint8(encode, dtype):
  array = (np.arange(6 * 7 * 4) % 200).reshape(6, 7, 4).astype(dtype)
  out = decode.decode_array(encode(array), "a")
  assert out.shape == (6, 7, 4)
  assert out.dtype == (np.uint8 if dtype == np.uint8 else np.float32)
  np.testing.assert_array_equal(out, array)
  assert decode.decode_array(encode(array[..., 0]), "a").shape == (6, 7, 1)


def test_arrays_of_other_ranks_are_decode_errors():
  with pytest.raises(ValueError, match="expected H x W or H x W x C"):
    decode.decode_array(_npy(np.zeros((2, 3, 4, 5))), "a.npy")


def test_a_channel_count_other_than_the_model_s_names_the_file():
  with pytest.raises(decode.DatasetMismatch, match=r"b/x.npy has 3 channels, but "
                     r"config.model.in_chans=4"):
    decode.check_channels(np.zeros((5, 6, 3)), 4, "b/x.npy")
  with pytest.raises(decode.DatasetMismatch, match="stored bands first"):
    decode.check_channels(np.zeros((4, 50, 60)), 4, "b/y.tif")
  assert not issubclass(decode.DatasetMismatch, (ValueError, OSError))  # never skipped


def test_channel_stats_are_over_all_pixels_in_normalization_units():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (10, 12, 1), dtype=np.uint8)
  b = rng.integers(0, 256, (7, 9, 1), dtype=np.uint8)
  mean, std, count = decode.channel_stats([a, b])
  every = np.concatenate([a.ravel(), b.ravel()]) / 255.0
  assert count == every.size
  np.testing.assert_allclose(mean, [every.mean()], rtol=1e-12)
  np.testing.assert_allclose(std, [every.std()], rtol=1e-9)
  bands = rng.normal(1000, 50, (20, 20, 3)).astype(np.float32)
  mean, std, _ = decode.channel_stats([bands])
  np.testing.assert_allclose(mean, bands.reshape(-1, 3).mean(0), rtol=1e-6)
  np.testing.assert_allclose(std, bands.reshape(-1, 3).std(0), rtol=1e-4)


def _encode(pixels, fmt):
  f = io.BytesIO()
  Image.fromarray(pixels).save(f, format=fmt, quality=90)
  return f.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("width,height", [(20, 13), (64, 48), (500, 375), (1600, 1200)])
def test_decoded_crops_equal_the_official_transforms_of_the_decoded_file(fmt, width, height):
  data = _encode(_photo(width, height), fmt)
  image = Image.open(io.BytesIO(data)).convert("RGB")
  for size in (32, 224):
    ours = decode.decode_and_crop(data, (size, size), None, crop_pct=0.875)
    np.testing.assert_array_equal(ours, _official_eval(image, size, 0.875))
  rng = np.random.default_rng(0)
  scales = []
  for size in ((32, 32), (224, 224), (48, 64)):
    for _ in range(4):
      box = random_resized_crop_box(rng, width, height, (0.08, 1.0), (3 / 4, 4 / 3))
      ours = decode.decode_and_crop(data, size, lambda w, h, b=box: b).astype(int)
      error = np.abs(ours - _official_train(image, box, size))
      scales.append(decode.dct_scale(box, size) if fmt == "JPEG" else 1)
      if scales[-1] == 1:
        assert error.max() == 0
      else:  # a JPEG decoded at 1/4 or 1/8 scale in the DCT domain: well within a grey level
        assert error.mean() < 1.0, (box, size, error.mean())
  assert max(scales) > 1 or fmt == "PNG" or width < 1600  # large JPEGs: the DCT path


def test_grayscale_files_read_as_one_channel_and_colour_ones_are_refused():
  grey = _photo(50, 40)[..., 1]
  for fmt in ("PNG", "JPEG"):
    data = _encode(grey, fmt)
    out = decode.decode_and_crop(data, (16, 24), None, channels=1, where="g")
    ref = Image.open(io.BytesIO(data)).resize(decode.eval_resize_shape(50, 40, (16, 24),
                                                                      0.875)[::-1], Image.BICUBIC)
    h, w = np.asarray(ref).shape
    top, left = int(round((h - 16) / 2)), int(round((w - 24) / 2))
    np.testing.assert_array_equal(out[..., 0], np.asarray(ref)[top:top + 16, left:left + 24])
    assert out.shape == (16, 24, 1)
    with pytest.raises(decode.DatasetMismatch, match="colour.png is a colour image"):
      decode.decode_and_crop(_encode(_photo(50, 40), fmt), (16, 16), None, channels=1,
                             where="colour.png")
  kind = "grayscale image converted to RGB"
  before = file_issue_counts().get(kind, 0)
  rgb = decode.decode_and_crop(_encode(grey, "PNG"), (16, 16), None, channels=3)
  assert rgb.shape == (16, 16, 3) and file_issue_counts()[kind] == before + 1
  with pytest.raises(decode.DatasetMismatch, match="in_chans=4"):
    decode.decode_and_crop(_encode(grey, "PNG"), (16, 16), None, channels=4)


def test_band_files_crop_like_pictures_and_cache_their_decode():
  rng = np.random.default_rng(0)
  bands = rng.uniform(0, 3000, (40, 60, 4)).astype(np.float32)
  cache = {}
  box = (5, 3, 30, 28)
  for encode in (_npy, _tif):
    out = decode.decode_and_crop(encode(bands), (16, 24), lambda w, h: box, channels=4,
                                 decoded=cache)
    np.testing.assert_array_equal(out, decode.crop_and_resize(bands, box, (16, 24)))
    np.testing.assert_array_equal(cache[1], bands)
    cache.clear()
  with pytest.raises(decode.DatasetMismatch, match="x.tif has 4 channels"):
    decode.decode_and_crop(_tif(bands), (16, 16), None, channels=3, where="x.tif")
