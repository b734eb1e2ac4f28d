"""MAE ViT-B pretraining on ImageNet-1k with the paper's recipe (docs/recipe.md; paper Table 8).

    python -m mae_jax.main --config=configs/vit_b.py --workdir=DIR
"""

from mae_jax import config_lib


def get_config(arg=None):
  config_lib.no_variant(arg, __file__)
  return config_lib.pretrain_config("vit_b")
