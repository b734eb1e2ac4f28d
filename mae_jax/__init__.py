"""mae_jax: Masked Autoencoders (He et al. 2021) in JAX/Flax."""


def load_encoder_params(path: str):
  """The pretrained encoder's params (big_vision ViT layout, nested dict of numpy arrays) from
  an npz written by `python -m mae_jax.export` or from a workdir."""
  from mae_jax import export  # pylint: disable=g-import-not-at-top
  return export.load_encoder_params(path)
