"""Linear-probing demo on the shipped handwritten digits (sklearn_digits: 1437 train, 360 test,
32x32, 10 classes), a few minutes on a CPU, starting from the configs/demo.py model pretrained
with MAE on the same digits (configs/demo_digits.py):

    python -m mae_jax.main --config=configs/demo_digits.py --workdir=workdirs/demo_digits
    python -m mae_jax.main --config=configs/linprobe_demo.py --workdir=workdirs/linprobe_demo

`--config.init_from=` (empty) probes the same model from a random init, for comparison;
`--config.init_from=workdirs/demo` starts from the photo-pretrained configs/demo.py run.
"""

from mae_jax import config_lib


def get_config(arg=None):
  config_lib.no_variant(arg, __file__)
  c = config_lib.linprobe_config("vit_b")
  c.init_from = "workdirs/demo_digits"
  c.model = config_lib.classifier_model_config(
      "vit_b", num_classes=10, img_size=32, patch_size=8, embed_dim=192, depth=6, num_heads=3,
      global_pool=False, head_batchnorm=True, head_init_std=0.01, dtype="float32")
  c.input.dataset = "sklearn_digits"
  c.input.crop_scale = (0.5, 1.0)
  c.input.random_flip = False
  c.input.batch_size = 256
  c.input.num_workers = 0
  c.eval_batch_size = 120
  c.total_steps = 300
  c.warmup_steps = 30
  # LARS moves each weight by ~lr x trust_coefficient (0.001) of its norm per step: the paper's
  # lr at batch 16384 (0.1 x 16384 / 256), for a 300-step probe.
  c.optimizer.lr = 6.4
  c.log_every_steps = 20
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  return c
