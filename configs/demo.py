"""A 3.2M-parameter MAE that learns on a 2-core CPU in a few minutes, on data that installs with
the package (random 64x64 crops of scikit-image's sample photographs).

    python -m mae_jax.main --config=configs/demo.py --workdir=workdirs/demo
"""

from mae_jax import config_lib


def get_config(arg=None):
  config_lib.no_variant(arg, __file__)
  c = config_lib.pretrain_config("vit_b")
  c.model = config_lib.model_config(
      "vit_b", img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3,
      decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, dtype="float32")
  c.input.dataset = "skimage_photos"
  c.input.batch_size = 64
  c.input.num_workers = 0
  c.input.decoded_cache_mb = 128  # the seven photos, decoded once (the same pixels, 7x the speed)
  c.total_steps = 300
  c.warmup_steps = 20
  c.optimizer.lr = 1e-3
  c.log_every_steps = 20
  c.checkpoint_every_steps = 100
  c.reconstruction_every_steps = 100
  return c
