"""Model FLOPs of one MAE training step, for TFLOP/s and MFU figures."""

from mae_jax.models.functional import num_kept
from mae_jax.models.vit import num_patches


def timed_mask_ratio(mask_ratio: float, num_patches: int) -> float:
  """The mask ratio that the benchmarks time for `mask_ratio`: itself, unless it masks no patch.

  At mask ratio 0.0 the loss, an error over the masked patches only, is 0/0 (NaN, as in the
  official code): a trainer skips or stops on it (mae_jax's non-finite guard skips the optimizer
  on CPU), so "the step at mask ratio 0.0" is timed with exactly one patch masked, on both sides.
  """
  if num_kept(num_patches, mask_ratio) < num_patches:
    return mask_ratio
  return 0.5 / num_patches  # keeps int(num_patches - 0.5) = num_patches - 1


def train_flops_per_image(model_config, mask_ratio: float) -> float:
  """3x the forward matmul and attention FLOPs (2 per multiply-add) of one image.

  Counts every matmul the step runs: patch embedding of all patches, the encoder over
  1 + keep tokens, decoder embedding, the decoder over 1 + L tokens and the prediction head.
  The per-image figures of the official code's reference measurements (ViT-B/16 58.2 GFLOPs)
  use the same rule within 1%.
  """
  m = model_config
  patches = num_patches(m.img_size, m.patch_size)
  patch_dim = m.patch_size**2 * m.in_chans
  t_enc = 1 + num_kept(patches, mask_ratio)
  t_dec = 1 + patches
  d, dd = m.embed_dim, m.decoder_embed_dim

  def blocks(depth, tokens, width):
    mlp = int(width * m.mlp_ratio)
    per_token = 4 * width * width + 2 * width * mlp + 2 * tokens * width
    return depth * tokens * per_token

  macs = (patches * patch_dim * d + blocks(m.depth, t_enc, d) + t_enc * d * dd +
          blocks(m.decoder_depth, t_dec, dd) + t_dec * dd * patch_dim)
  return 3 * 2 * macs
