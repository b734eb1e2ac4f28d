"""End-to-end fine-tuning of a pretrained MAE ViT-H on ImageNet-1k (docs/recipe.md).

    python -m mae_jax.main --config=configs/finetune_vit_h.py --workdir=DIR \
        --config.init_from=PRETRAIN_WORKDIR
"""

from mae_jax import config_lib


def get_config(arg=None):
  config_lib.no_variant(arg, __file__)
  return config_lib.finetune_config("vit_h")
