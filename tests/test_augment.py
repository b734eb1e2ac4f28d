"""Fine-tuning augmentations: mixup/cutmix by hand, RandAugment ops against PIL, erasing."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from mae_jax import augment as A


def _batch(b=4, h=8, w=8):
  return jnp.asarray(np.arange(b * h * w * 3, dtype=np.float32).reshape(b, h, w, 3) / 100.0)


def test_mixup_by_hand():
  images = _batch()
  labels = jnp.asarray([0, 1, 2, 1])
  out, targets = A.mix(images, labels, 3, jnp.asarray(0.3), jnp.asarray(False),
                       (0, 0, 0, 0), smoothing=0.1)
  x = np.asarray(images)
  np.testing.assert_allclose(out, 0.3 * x + 0.7 * x[::-1], rtol=1e-6)
  off, on = 0.1 / 3, 0.9 + 0.1 / 3
  # Row 0 mixes label 0 (weight 0.3) with the last example's label 1 (weight 0.7).
  np.testing.assert_allclose(targets[0], [0.3 * on + 0.7 * off, 0.3 * off + 0.7 * on, off],
                             rtol=1e-6)
  # Row 1 mixes label 1 with row 2's label 2.
  np.testing.assert_allclose(targets[1], [off, 0.3 * on + 0.7 * off, 0.3 * off + 0.7 * on],
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(targets).sum(1), 1.0, rtol=1e-6)


def test_cutmix_box_and_lambda_by_hand():
  # lam 0.75 on 8x8: cut = int(8 * sqrt(0.25)) = 4, half 2; centre (1, 6) -> rows [0, 3),
  # cols [4, 8) after clipping: 12 pixels, so the corrected lam is 1 - 12 / 64.
  box = A.cutmix_box(jnp.asarray(0.75), jnp.asarray(1), jnp.asarray(6), 8, 8)
  assert tuple(int(v) for v in box) == (0, 3, 4, 8)
  images = _batch()
  labels = jnp.asarray([2, 0, 1, 1])
  out, targets = A.mix(images, labels, 3, jnp.asarray(0.75), jnp.asarray(True), box,
                       smoothing=0.0)
  x = np.asarray(images)
  expected = x.copy()
  expected[:, 0:3, 4:8] = x[::-1, 0:3, 4:8]
  np.testing.assert_array_equal(out, expected)
  lam = 1 - 12 / 64
  np.testing.assert_allclose(targets[0], [0, 1 - lam, lam], rtol=1e-6)  # 2 with row 3's 1
  np.testing.assert_allclose(targets[1], [lam, 1 - lam, 0], rtol=1e-6)  # 0 with row 2's 1


def test_sampled_mixup_cutmix_is_consistent_and_deterministic():
  images = _batch(b=4, h=16, w=16)
  labels = jnp.asarray([0, 1, 2, 3])
  x = np.asarray(images)
  run = jax.jit(lambda k: A.mixup_cutmix(k, images, labels, 4))
  kinds = set()
  for seed in range(12):
    out, targets = map(np.asarray, run(jax.random.key(seed)))
    lam = targets[0, 0] - 0.1 / 4  # row 0 is label 0, its partner label 3
    lam = lam / 0.9
    if np.all((out == x) | (out == x[::-1])):  # cutmix: every pixel from one image
      kinds.add("cutmix")
      from_partner = np.mean(np.all(out[0] == x[3], axis=-1) & np.any(x[0] != x[3], axis=-1))
      np.testing.assert_allclose(1 - lam, from_partner, atol=1e-5)
    else:
      kinds.add("mixup")
      np.testing.assert_allclose(out, lam * x + (1 - lam) * x[::-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
  assert kinds == {"cutmix", "mixup"}
  a, b = run(jax.random.key(3)), run(jax.random.key(3))
  np.testing.assert_array_equal(a[0], b[0])


def test_random_erasing_replaces_one_box_with_noise():
  images = jnp.full((16, 20, 24, 3), 7.0)
  out = np.asarray(jax.jit(lambda k: A.random_erasing(k, images, prob=1.0))(jax.random.key(0)))
  changed = np.any(out != 7.0, axis=-1)
  for c in changed:
    rows, cols = np.flatnonzero(c.any(1)), np.flatnonzero(c.any(0))
    assert c.sum() == len(rows) * len(cols)  # a filled rectangle
    assert 0.02 * 480 * 0.5 <= c.sum() <= 480 / 3 * 1.5
  erased = out[np.broadcast_to(changed[..., None], out.shape)]
  assert abs(erased.mean()) < 0.2 and 0.8 < erased.std() < 1.2  # per-pixel N(0, 1)
  untouched = jax.jit(lambda k: A.random_erasing(k, images, prob=0.0))(jax.random.key(0))
  np.testing.assert_array_equal(untouched, images)


@pytest.fixture(scope="module")
def photo():
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
  img = np.asarray(Image.fromarray(noise).resize((32, 24), Image.BICUBIC))
  return img, Image.fromarray(img), jnp.asarray(img, jnp.float32)


def _close_to_pil(ours, ref):
  d = np.abs(np.asarray(ours).astype(int) - np.asarray(ref).astype(int))
  assert d.max() <= 1 and np.mean(d == 0) > 0.99, (d.max(), np.mean(d == 0))


def test_point_ops_equal_pil(photo):
  img, pil, x = photo
  low = Image.fromarray((img // 3 + 60).astype(np.uint8))
  for image in (pil, low):
    xi = jnp.asarray(np.asarray(image), jnp.float32)
    hist = A._histogram(xi)
    np.testing.assert_array_equal(A.apply_lut(xi, A.auto_contrast_lut(hist)),
                                  ImageOps.autocontrast(image))
    np.testing.assert_array_equal(A.apply_lut(xi, A.equalize_lut(hist)),
                                  ImageOps.equalize(image))
  for bits in (1, 2, 4):
    np.testing.assert_array_equal(A.apply_lut(x, A.posterize_lut(jnp.asarray(bits))),
                                  ImageOps.posterize(pil, bits))
  np.testing.assert_array_equal(A.apply_lut(x, A.posterize_lut(jnp.asarray(0))), 0)
  np.testing.assert_array_equal(A.apply_lut(x, A.solarize_lut(jnp.asarray(100))),
                                ImageOps.solarize(pil, 100))
  expected = np.where(img < 128, np.minimum(img.astype(int) + 40, 255), img)
  np.testing.assert_array_equal(A.apply_lut(x, A.solarize_add_lut(jnp.asarray(40))), expected)


@pytest.mark.parametrize("factor", [0.1, 0.55, 1.7])
def test_enhance_ops_equal_pil(photo, factor):
  _, pil, x = photo
  np.testing.assert_array_equal(A.blend(A.grayscale(x), x, factor),
                                ImageEnhance.Color(pil).enhance(factor))
  np.testing.assert_array_equal(A.blend(A.mean_gray(x), x, factor),
                                ImageEnhance.Contrast(pil).enhance(factor))
  np.testing.assert_array_equal(A.blend(jnp.zeros_like(x), x, factor),
                                ImageEnhance.Brightness(pil).enhance(factor))
  np.testing.assert_array_equal(A.blend(A.smooth(x), x, factor),
                                ImageEnhance.Sharpness(pil).enhance(factor))


def test_affine_ops_equal_pil_bicubic_with_mean_fill(photo):
  _, pil, x = photo
  h, w = 24, 32
  kw = dict(resample=Image.BICUBIC, fillcolor=A.FILL)
  for degrees in (13.0, -27.0):
    _close_to_pil(A.affine(x, A.rotate_matrix(jnp.asarray(degrees), h, w)),
                  pil.rotate(degrees, **kw))
  for m in ((1, 0.2, 0, 0, 1, 0), (1, 0, 0, -0.27, 1, 0), (1, 0, 0.3 * w, 0, 1, 0),
            (1, 0, 0, 0, 1, -0.123 * h)):
    _close_to_pil(A.affine(x, jnp.asarray(m, jnp.float32)),
                  pil.transform(pil.size, Image.AFFINE, m, **kw))


def test_affine_ops_on_float_bands_equal_pil_float_images():
  # Bands in their own units (reflectance up to 10000): PIL's "F" images, neither clipped nor
  # rounded, the corners at a fill in the same units.
  bands = np.random.default_rng(1).uniform(0, 10000, (24, 32)).astype(np.float32)
  pil, x = Image.fromarray(bands, "F"), jnp.asarray(bands[..., None])
  kw = dict(resample=Image.BICUBIC, fillcolor=4000.0)
  fill = A.fill_colour((4000.0,), uint8=False)
  for degrees in (13.0, -27.0):
    np.testing.assert_allclose(
        A.affine(x, A.rotate_matrix(jnp.asarray(degrees), 24, 32), fill, uint8=False)[..., 0],
        pil.rotate(degrees, **kw), atol=0.05)
  for m in ((1, 0.2, 0, 0, 1, 0), (1, 0, 0, -0.27, 1, 0), (1, 0, 9.6, 0, 1, 0)):
    out = A.affine(x, jnp.asarray(m, jnp.float32), fill, uint8=False)[..., 0]
    np.testing.assert_allclose(out, pil.transform(pil.size, Image.AFFINE, m, **kw), atol=0.05)
  assert float(out.max()) > 255 and float(out.min()) < 0  # bicubic overshoot, kept


def test_rand_augment_policy_string_and_batches():
  assert A.parse_rand_augment("rand-m9-mstd0.5-inc1") == A.RandAugmentPolicy(
      magnitude=9.0, magnitude_std=0.5, num_layers=2, increasing=True)
  assert A.parse_rand_augment("rand-m7-n3").num_layers == 3
  for bad in ("v0", "rand-m9-w0", "rand-x"):
    with pytest.raises(ValueError, match="rand_augment"):
      A.parse_rand_augment(bad)
  pixels = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3)), jnp.float32)
  run = jax.jit(lambda k: A.rand_augment(k, pixels))
  out = np.asarray(run(jax.random.key(0)))
  np.testing.assert_array_equal(out, run(jax.random.key(0)))
  assert out.min() >= 0 and out.max() <= 255 and np.all(out == np.round(out))
  changed = [not np.array_equal(o, p) for o, p in zip(out, np.asarray(pixels))]
  assert 0 < sum(changed) <= 8  # each op applies with probability 0.5 (both skipped: 1/4)
  assert not np.array_equal(out, run(jax.random.key(1)))


def test_finetune_augment_pipeline():
  config = ml_collections.ConfigDict(dict(rand_augment="rand-m9-mstd0.5-inc1", reprob=0.25,
                                          mixup=0.8, cutmix=1.0, mixup_prob=1.0,
                                          mixup_switch_prob=0.5, smoothing=0.1))
  pixels = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3)), jnp.uint8)
  images = A.from_pixels(pixels)
  np.testing.assert_allclose(images[0, 0, 0], (np.asarray(pixels[0, 0, 0]) / 255.0 - np.asarray(
      A.IMAGENET_MEAN)) / np.asarray(A.IMAGENET_STD), rtol=1e-5)
  labels = jnp.asarray([0, 1, 2, 3])
  run = jax.jit(lambda k: A.finetune_augment(k, pixels, labels, 5, config))
  out, targets = run(jax.random.key(0))
  assert out.shape == images.shape and targets.shape == (4, 5)
  np.testing.assert_allclose(np.asarray(targets).sum(1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(out, run(jax.random.key(0))[0])
  config.update(dict(rand_augment="", reprob=0.0, mixup=0.0, cutmix=0.0))
  plain, smoothed = A.finetune_augment(jax.random.key(0), pixels, labels, 5, config)
  np.testing.assert_array_equal(plain, images)
  np.testing.assert_allclose(smoothed[0], [0.92, 0.02, 0.02, 0.02, 0.02], rtol=1e-6)
