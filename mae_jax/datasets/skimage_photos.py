"""scikit-image's sample colour photographs as an unlabeled TFDS image dataset.

The files are stored as they ship (PNG or JPEG bytes, no re-encoding), so the pretraining demo
reads them through the same decode-and-crop path as ImageNet's JPEGs.
"""

import tensorflow_datasets as tfds

from mae_jax.sample_photos import photo_path
from mae_jax.sample_photos import TEST_FILES
from mae_jax.sample_photos import TRAIN_FILES


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
