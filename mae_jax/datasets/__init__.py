"""TFDS builders for the image data that installs with mae_jax's dependencies.

Importing this package registers them with TFDS; `mae_jax.input_pipeline` builds them into the
TFDS data_dir on first use (no download, no manual step).
"""

from mae_jax.datasets.skimage_photos import SkimagePhotos
from mae_jax.datasets.sklearn_digits import SklearnDigits
