"""PyTorch reference for `mae_jax.benchmark`: transformers' ViTMAEForPreTraining (a faithful
stand-in for the official models_mae.py), or the official models_mae.py itself from a checkout
(`--impl=official --mae_repo=PATH`, needs timm; see `mae_jax.official`), with bf16 autocast on
GPU, AdamW (fused on CUDA), the same model sizes, batch and timing rules as the JAX benchmark.

    python -m mae_jax.benchmarks.torch_reference --size=vit_l --batch_size=256 --steps=20
    python -m mae_jax.benchmarks.torch_reference --impl=official --mae_repo=/path/to/mae ...

Last line: one JSON object with img_per_s, tflops, peak_memory_gb, step_s.
"""

import argparse
import json
import os
import time
from typing import List, Optional

from mae_jax import config_lib
from mae_jax.benchmarks.flops import timed_mask_ratio, train_flops_per_image


IMPLS = ("transformers", "official")


def _transformers_model(m, mask_ratio: float):
  """transformers' ViTMAEForPreTraining of `config.model` m, and its loss function."""
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.ViTMAEConfig(
      hidden_size=m.embed_dim, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
      intermediate_size=int(m.embed_dim * m.mlp_ratio), image_size=m.img_size,
      patch_size=m.patch_size, num_channels=m.in_chans, decoder_hidden_size=m.decoder_embed_dim,
      decoder_num_hidden_layers=m.decoder_depth, decoder_num_attention_heads=m.decoder_num_heads,
      decoder_intermediate_size=int(m.decoder_embed_dim * m.mlp_ratio), layer_norm_eps=1e-6,
      norm_pix_loss=m.norm_pix_loss, mask_ratio=mask_ratio, attn_implementation="sdpa")
  model = transformers.ViTMAEForPreTraining(config)
  return model, lambda images: model(pixel_values=images).loss


def _official_model(m, mask_ratio: float, mae_repo: str):
  """The official MaskedAutoencoderViT of `config.model` m, and its loss function."""
  from mae_jax import official  # pylint: disable=g-import-not-at-top
  models_mae, _ = official.import_official(mae_repo)
  model = official.official_mae(models_mae, m)
  return model, lambda images: model(images, mask_ratio=mask_ratio)[0]


def run(size: str, batch_size: int, steps: int, warmup: int, mask_ratio: float,
        compile_model: bool, img_size: int = 224, impl: str = "transformers",
        mae_repo: Optional[str] = None, model_overrides: Optional[dict] = None) -> dict:
  """Times `steps` training steps after `warmup` ones; returns the figures.

  `model_overrides`: fields of `config_lib.model_config(size)` to change (a smaller model).
  """
  import torch  # pylint: disable=g-import-not-at-top

  if impl not in IMPLS:
    raise ValueError(f"impl {impl!r} is not one of {IMPLS}")
  if impl == "official" and not mae_repo:
    raise ValueError("impl 'official' needs mae_repo, a clone of "
                     "https://github.com/facebookresearch/mae")
  m = config_lib.model_config(size, **{"img_size": img_size, **(model_overrides or {})})
  mask_ratio = timed_mask_ratio(mask_ratio, (m.img_size // m.patch_size) ** 2)
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  if impl == "official":
    model, loss_fn = _official_model(m, mask_ratio, mae_repo)
  else:
    model, loss_fn = _transformers_model(m, mask_ratio)
  model = model.to(device).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                          fused=cuda)
  images = torch.randn(batch_size, m.in_chans, m.img_size, m.img_size, device=device)
  dtype = torch.bfloat16 if cuda else torch.float32

  def step():
    with torch.autocast(device.type, dtype=dtype, enabled=cuda):
      loss = loss_fn(images)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  fn = torch.compile(step) if compile_model else step
  t0 = time.perf_counter()
  for _ in range(warmup):
    fn()
  if cuda:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
  warm_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    fn()
  if cuda:
    torch.cuda.synchronize()
  dt = (time.perf_counter() - t0) / steps
  flops = train_flops_per_image(m, mask_ratio) * batch_size / dt
  name = "torch" if impl == "transformers" else "official"
  return dict(impl=name + ("_compile" if compile_model else ""), size=size,
              batch_size=batch_size, mask_ratio=mask_ratio, step_s=dt,
              img_per_s=batch_size / dt, tflops=flops / 1e12,
              peak_memory_gb=(torch.cuda.max_memory_allocated() / 2**30) if cuda else None,
              warmup_s=warm_s, device=torch.cuda.get_device_name() if cuda else "cpu",
              torch=torch.__version__, model_code=impl,
              glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))


def main(argv: Optional[List[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="vit_l", choices=sorted(config_lib.MODEL_SIZES))
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--mask_ratio", type=float, default=0.75)
  parser.add_argument("--img_size", type=int, default=224)
  parser.add_argument("--compile", action="store_true", help="torch.compile the step")
  parser.add_argument("--model_overrides", type=json.loads, default=None,
                      help='Model fields to change, as JSON: \'{"depth": 2, "img_size": 32}\'')
  parser.add_argument("--impl", default="transformers", choices=IMPLS,
                      help="transformers' ViTMAE, or the official models_mae.py (--mae_repo)")
  parser.add_argument("--mae_repo", default=None,
                      help="A clone of https://github.com/facebookresearch/mae (--impl=official)")
  args = parser.parse_args(argv)
  if args.impl == "official" and not args.mae_repo:
    parser.error("--impl=official needs --mae_repo=PATH, a clone of "
                 "https://github.com/facebookresearch/mae")
  result = run(args.size, args.batch_size, args.steps, args.warmup, args.mask_ratio,
               args.compile, args.img_size, args.impl, args.mae_repo, args.model_overrides)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
