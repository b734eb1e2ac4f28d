"""configs/demo.py's 3.2M-parameter MAE pretrained on the shipped handwritten digits
(sklearn_digits, 32x32), the start of configs/finetune_demo.py and configs/linprobe_demo.py:

    python -m mae_jax.main --config=configs/demo_digits.py --workdir=workdirs/demo_digits
"""

from mae_jax import config_lib


def get_config(arg=None):
  config_lib.no_variant(arg, __file__)
  c = config_lib.pretrain_config("vit_b")
  c.model = config_lib.model_config(
      "vit_b", img_size=32, patch_size=8, embed_dim=192, depth=6, num_heads=3,
      decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, dtype="float32")
  c.input.dataset = "sklearn_digits"
  # Crops that keep a digit recognisable, never mirrored (a mirrored 2 is no digit).
  c.input.crop_scale = (0.5, 1.0)
  c.input.random_flip = False
  c.input.batch_size = 64
  c.input.num_workers = 0
  c.total_steps = 2000
  c.warmup_steps = 100
  c.optimizer.lr = 1e-3
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  c.reconstruction_every_steps = 500
  # kNN top-1 on the 360 test digits, the 1437 train digits as neighbours, every 500 steps.
  c.monitor.every_steps = 500
  c.monitor.train_examples = 0
  return c
