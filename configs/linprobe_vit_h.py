"""Linear probing of a pretrained MAE ViT-H on ImageNet-1k (docs/recipe.md; paper Table 10).

    python -m mae_jax.main --config=configs/linprobe_vit_h.py --workdir=DIR \
        --config.init_from=PRETRAIN_WORKDIR
"""

from mae_jax import config_lib


def get_config(arg=None):
  config_lib.no_variant(arg, __file__)
  return config_lib.linprobe_config("vit_h")
