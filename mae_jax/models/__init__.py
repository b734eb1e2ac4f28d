"""MAE models: pure functions, Flax modules and parameter-layout converters."""

from mae_jax.models.functional import (mae_loss, masked_mse, normalized_targets, num_kept,
                                       patchify, random_masking, sincos_pos_embed_2d,
                                       unnormalize_pred, unpatchify)
from mae_jax.models.layout import is_scanned, scan_to_unrolled, unrolled_to_scan
from mae_jax.models.mae import MaskedAutoencoder, from_config
from mae_jax.models.vit import (ImageSize, canonical_img_size, image_hw, num_patches,
                                patch_grid)

__all__ = [
    "ImageSize", "MaskedAutoencoder", "canonical_img_size", "from_config", "image_hw",
    "num_patches", "patch_grid", "mae_loss", "masked_mse", "normalized_targets", "num_kept", "patchify",
    "random_masking", "sincos_pos_embed_2d", "unnormalize_pred", "unpatchify", "is_scanned",
    "scan_to_unrolled", "unrolled_to_scan",
]
