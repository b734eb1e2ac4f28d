"""scikit-image's sample colour photographs as an unlabeled TFDS image dataset.

The files are stored as they ship (PNG or JPEG bytes, no re-encoding), so the pretraining demo
reads them through the same decode-and-crop path as ImageNet's JPEGs.
"""

import os

import skimage.data
import tensorflow_datasets as tfds

# The colour photographs in scikit-image's wheel (synthetic images, charts and grayscale ones are
# left out). Two are held out for evaluation: a cat and a rocket, unlike anything in train.
TRAIN_FILES = ("astronaut.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
               "motorcycle_left.png", "motorcycle_right.png", "retina.jpg")
TEST_FILES = ("chelsea.png", "rocket.jpg")


def photo_path(name: str) -> str:
  """Where scikit-image installed one of its sample files."""
  return os.path.join(os.path.dirname(skimage.data.__file__), name)


class SkimagePhotos(tfds.core.GeneratorBasedBuilder):
  """scikit-image's sample colour photographs (unlabeled; random crops for pretraining)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "The colour photographs of scikit-image's sample data."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "file_name": tfds.features.Text(),
        }),
        homepage="https://scikit-image.org/docs/stable/api/skimage.data.html",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The files come with scikit-image.
    return {"train": self._generate_examples(TRAIN_FILES),
            "test": self._generate_examples(TEST_FILES)}

  def _generate_examples(self, names):
    for name in names:
      yield name, {"image": photo_path(name), "file_name": name}
