"""scikit-learn's 8x8 handwritten digits, upscaled to 32x32 RGB, as a labeled TFDS dataset."""

import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

SIZE = 32           # stored image side; the input pipeline resizes to the model's img_size
TEST_EVERY = 5      # every 5th digit is held out: 360 test, 1437 train, all ten classes in each


def digit_png(pixels: np.ndarray) -> bytes:
  """One digit (8x8, values 0-16, 16 = ink) as a white-on-black 32x32 RGB PNG."""
  grey = np.round(pixels.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)
  image = Image.fromarray(grey, "L").resize((SIZE, SIZE), Image.BICUBIC).convert("RGB")
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits (1797 images, 10 classes) for fine-tuning demos."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "sklearn.datasets.load_digits, 32x32 RGB, every 5th one in test."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(SIZE, SIZE, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The digits come with scikit-learn.
    # Imported here, on the one build: importing scikit-learn (and the SciPy it loads) takes
    # seconds, which every run that registers the shipped datasets would pay otherwise.
    import sklearn.datasets  # pylint: disable=g-import-not-at-top
    digits = sklearn.datasets.load_digits()
    index = np.arange(len(digits.target))
    test = index % TEST_EVERY == 0
    return {"train": self._generate_examples(digits, index[~test]),
            "test": self._generate_examples(digits, index[test])}

  def _generate_examples(self, digits, indices):
    for i in indices:
      yield int(i), {"image": digit_png(digits.images[i]), "label": int(digits.target[i])}
