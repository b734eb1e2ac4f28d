"""scikit-image's sample colour photographs: which files, and where they are installed.

Kept apart from the TFDS builder that serves them (`mae_jax.datasets.skimage_photos`) so that
code without TensorFlow (the input-pipeline benchmark on GPU hosts) can read them too.
"""

import os

import skimage.data

# The colour photographs in scikit-image's wheel (synthetic images, charts and grayscale ones are
# left out). Two are held out for evaluation: a cat and a rocket, unlike anything in train.
TRAIN_FILES = ("astronaut.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
               "motorcycle_left.png", "motorcycle_right.png", "retina.jpg")
TEST_FILES = ("chelsea.png", "rocket.jpg")


def photo_path(name: str) -> str:
  """Where scikit-image installed one of its sample files."""
  return os.path.join(os.path.dirname(skimage.data.__file__), name)
