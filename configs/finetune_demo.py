"""Fine-tuning demo on the shipped handwritten digits (sklearn_digits: 1437 train, 360 test,
32x32, 10 classes), a few minutes on a CPU, starting from the configs/demo.py model pretrained
with MAE on the same digits (configs/demo_digits.py):

    python -m mae_jax.main --config=configs/demo_digits.py --workdir=workdirs/demo_digits
    python -m mae_jax.main --config=configs/finetune_demo.py --workdir=workdirs/finetune_demo

`--config.init_from=` (empty) fine-tunes the same model from a random init, for comparison;
`--config.init_from=workdirs/demo` starts from the photo-pretrained configs/demo.py run.
"""

from mae_jax import config_lib


def get_config(arg=None):
  config_lib.no_variant(arg, __file__)
  c = config_lib.finetune_config("vit_b")
  c.init_from = "workdirs/demo_digits"
  # The encoder of configs/demo.py (from workdirs/demo, at 64x64, its 8x8 position table is
  # resampled to this 4x4 grid).
  c.model = config_lib.classifier_model_config(
      "vit_b", num_classes=10, img_size=32, patch_size=8, embed_dim=192, depth=6, num_heads=3,
      drop_path=0.1, dtype="float32")
  c.input.dataset = "sklearn_digits"
  # The ImageNet recipe's augmentation (crops down to 8%, flips, RandAugment, erasing, mixup,
  # cutmix) leaves little of a 32x32 digit: gentle crops, no mirroring, no mixing here.
  c.input.crop_scale = (0.5, 1.0)
  c.input.random_flip = False
  c.augment.rand_augment = ""
  c.augment.reprob = 0.0
  c.augment.mixup = 0.0
  c.augment.cutmix = 0.0
  c.input.batch_size = 64
  c.input.num_workers = 0
  c.eval_batch_size = 120
  c.total_steps = 300
  c.warmup_steps = 20
  c.optimizer.lr = 1e-3
  c.optimizer.layer_decay = 0.75
  c.log_every_steps = 20
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  return c
