"""Checks mae_jax against the official PyTorch MAE code, read from a checkout you provide.

    git clone https://github.com/facebookresearch/mae /path/to/mae
    pip install -e '.[torch]' timm
    python -m mae_jax.official --mae_repo=/path/to/mae

gives the official `models_mae.MaskedAutoencoderViT` and `models_vit.VisionTransformer` random
weights, converts them with `mae_jax.convert.params_from_torch`, feeds both sides the same images
and the same masking noise, and prints, per case, how far mae_jax (float32) is from the official
model (run in float64): the loss, the reconstruction, the mask, the encoder's latent and
`ids_restore`, every parameter's gradient, and the classifier's logits. The last line is one JSON
object; the exit status is 1 when any figure is over its tolerance.

The official code is not a dependency: only this module and
`mae_jax.benchmarks.torch_reference --impl=official` import it, from `--mae_repo`. It was written
against timm 0.3.2 and numpy < 1.24; `import_official` bridges the two differences that stop it
from importing with today's versions (see there), without touching its maths.
"""

import argparse
import functools
import importlib
import inspect
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

# A case fails when mae_jax is further than this from the float64 official model (relative to the
# largest magnitude of the official value; float32 arithmetic gives ~1e-6).
TOLERANCE = 1e-4

# Small models, so that the check takes seconds on a CPU; the code paths are those of every size.
MAE_CASES = (
    dict(img_size=32, patch_size=8, norm_pix_loss=True, mask_ratio=0.75),
    dict(img_size=32, patch_size=8, norm_pix_loss=False, mask_ratio=0.75),
    dict(img_size=48, patch_size=16, norm_pix_loss=True, mask_ratio=0.5),
)
CLASSIFIER_CASES = (dict(global_pool=True), dict(global_pool=False))
SMALL = dict(in_chans=3, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
             decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0)


def repo_problem(mae_repo: str) -> Optional[str]:
  """Why `mae_repo` is not a clone of the official code (an error message), or None if it is."""
  if os.path.isfile(os.path.join(mae_repo, "models_mae.py")):
    return None
  return (f"--mae_repo={mae_repo} has no models_mae.py: pass the folder of a clone of "
          f"https://github.com/facebookresearch/mae")


def import_official(mae_repo: str) -> Tuple[Any, Any]:
  """`models_mae` and `models_vit` from a checkout of facebookresearch/mae.

  Two bridges to today's libraries, neither of which changes what the code computes:
  `numpy.float` (removed in numpy 1.24; util/pos_embed.py uses it as a dtype) is set to `float`,
  which is what it always was; and timm's `Block`, which lost the `qk_scale` argument after
  timm 0.4 (the official code always passes None, i.e. the default 1/sqrt(head_dim)), is given a
  subclass that accepts and drops it.
  """
  problem = repo_problem(mae_repo)
  if problem:
    raise FileNotFoundError(problem)
  try:
    importlib.import_module("torch")
    import timm.models.vision_transformer as timm_vit  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"the official code needs torch and timm ({e}): pip install -e "
                      f"'.[torch]' timm") from e
  if "float" not in np.__dict__:
    np.float = float  # pylint: disable=attribute-defined-outside-init
  if "qk_scale" not in inspect.signature(timm_vit.Block.__init__).parameters:
    base = timm_vit.Block

    class Block(base):  # pylint: disable=missing-class-docstring
      def __init__(self, *args, qk_scale=None, **kwargs):
        if qk_scale is not None:
          raise ValueError("qk_scale other than None is not supported by this timm")
        super().__init__(*args, **kwargs)

    timm_vit.Block = Block
  sys.path.insert(0, os.path.abspath(mae_repo))
  try:
    return importlib.import_module("models_mae"), importlib.import_module("models_vit")
  finally:
    sys.path.pop(0)


def official_mae(models_mae, fields: Dict[str, Any]):
  """The official `MaskedAutoencoderViT` with the constructor fields of a mae_jax `config.model`
  (the same names), LayerNorm eps 1e-6 as in its named sizes."""
  import torch  # pylint: disable=g-import-not-at-top
  names = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
           "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "mlp_ratio",
           "norm_pix_loss")
  return models_mae.MaskedAutoencoderViT(
      **{k: fields[k] for k in names},
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))


def _perturb(model, seed: int) -> None:
  """Adds noise to every trainable parameter: the official init leaves biases and tokens at
  zero, where a wrong mapping would go unseen. The fixed sin-cos tables stay as they are."""
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      if p.requires_grad:
        p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _rel(ours, ref) -> float:
  """max |ours - ref| / max |ref|."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def _state_dict(model) -> Dict[str, np.ndarray]:
  """The model's state dict as numpy, floating point in float32 (what checkpoints hold)."""
  out = {}
  for k, v in model.state_dict().items():
    v = v.detach().cpu()
    out[k] = v.float().numpy() if v.is_floating_point() else v.numpy()
  return out


def mae_case(models_mae, img_size: int, patch_size: int, norm_pix_loss: bool,
             mask_ratio: float, batch: int = 3, seed: int = 0) -> Dict[str, Any]:
  """One MAE comparison: the official forward (and backward) in float64 and mae_jax's."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from mae_jax import convert  # pylint: disable=g-import-not-at-top
  from mae_jax.models import MaskedAutoencoder  # pylint: disable=g-import-not-at-top

  fields = dict(SMALL, img_size=img_size, patch_size=patch_size, norm_pix_loss=norm_pix_loss)
  torch.manual_seed(seed)
  official = official_mae(models_mae, fields).double().train()
  _perturb(official, seed)
  images = torch.randn(batch, fields["in_chans"], img_size, img_size,
                       generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
  num_patches = (img_size // patch_size) ** 2
  # random_masking draws its noise with torch.rand(N, L) first thing after the seed: the same
  # draw, repeated, is the noise mae_jax gets.
  torch.manual_seed(seed + 2)
  loss, pred, mask = official(images, mask_ratio=mask_ratio)
  loss.backward()
  torch.manual_seed(seed + 2)
  noise = torch.rand(batch, num_patches)
  torch.manual_seed(seed + 2)
  with torch.no_grad():
    latent, _, ids_restore = official.forward_encoder(images, mask_ratio)

  params = convert.params_from_torch(_state_dict(official))
  model = MaskedAutoencoder(**fields)
  x = jnp.asarray(images.permute(0, 2, 3, 1).numpy().astype(np.float32))
  z = jnp.asarray(noise.numpy())

  def loss_fn(p):
    l, pr, mk = model.apply({"params": p}, x, mask_ratio=mask_ratio, noise=z)
    return l, (pr, mk)

  (our_loss, (our_pred, our_mask)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  our_latent, _, our_ids = model.apply({"params": params}, x, mask_ratio=mask_ratio, noise=z,
                                       method=MaskedAutoencoder.encode)
  torch_grads = {k: p.grad.numpy() for k, p in official.named_parameters() if p.grad is not None}
  our_grads = convert.params_to_torch(grads)
  missing = sorted(set(torch_grads) - set(our_grads))
  grad_rel = {k: _rel(our_grads[k], g) for k, g in torch_grads.items() if k in our_grads}
  worst = max(grad_rel, key=grad_rel.get)
  result = dict(case=f"mae img{img_size} patch{patch_size} norm_pix={norm_pix_loss} "
                     f"mask_ratio={mask_ratio}",
                loss=_rel(our_loss, loss.item()), pred=_rel(our_pred, pred.detach().numpy()),
                latent=_rel(our_latent, latent.numpy()),
                grad=grad_rel[worst], worst_grad=worst,
                mask_equal=bool(np.array_equal(np.asarray(our_mask), mask.numpy())),
                ids_restore_equal=bool(np.array_equal(np.asarray(our_ids), ids_restore.numpy())),
                missing_grads=missing)
  result["ok"] = (max(result["loss"], result["pred"], result["latent"], result["grad"])
                  <= TOLERANCE and result["mask_equal"] and result["ids_restore_equal"]
                  and not missing)
  return result


def classifier_case(models_vit, global_pool: bool, num_classes: int = 10, batch: int = 3,
                    seed: int = 0) -> Dict[str, Any]:
  """One classifier comparison: the official fine-tuning ViT's logits (eval mode) and ours."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from mae_jax import convert  # pylint: disable=g-import-not-at-top
  from mae_jax.models.classifier import VisionTransformer  # pylint: disable=g-import-not-at-top

  img_size, patch_size = 32, 8
  torch.manual_seed(seed)
  official = models_vit.VisionTransformer(
      global_pool=global_pool, img_size=img_size, patch_size=patch_size,
      embed_dim=SMALL["embed_dim"], depth=SMALL["depth"], num_heads=SMALL["num_heads"],
      mlp_ratio=SMALL["mlp_ratio"], qkv_bias=True, num_classes=num_classes,
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).double().eval()
  _perturb(official, seed)
  images = torch.randn(batch, 3, img_size, img_size,
                       generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
  with torch.no_grad():
    # head(forward_features(x)) is the official forward; timm >= 0.9 routes forward() through
    # its own pooling, which the official subclass predates.
    logits = official.head(official.forward_features(images)).numpy()
  params = convert.params_from_torch(_state_dict(official))
  model = VisionTransformer(num_classes=num_classes, img_size=img_size, patch_size=patch_size,
                            embed_dim=SMALL["embed_dim"], depth=SMALL["depth"],
                            num_heads=SMALL["num_heads"], mlp_ratio=SMALL["mlp_ratio"],
                            global_pool=global_pool)
  ours = model.apply({"params": params},
                     jnp.asarray(images.permute(0, 2, 3, 1).numpy().astype(np.float32)))
  result = dict(case=f"classifier global_pool={global_pool}", logits=_rel(ours, logits))
  result["ok"] = result["logits"] <= TOLERANCE
  return result


def run(mae_repo: str) -> List[Dict[str, Any]]:
  """Every case; each a dict of relative differences and an `ok`."""
  models_mae, models_vit = import_official(mae_repo)
  results = [mae_case(models_mae, **case) for case in MAE_CASES]
  results += [classifier_case(models_vit, **case) for case in CLASSIFIER_CASES]
  return results


def main(argv: Optional[List[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mae_repo", required=True,
                      help="A clone of https://github.com/facebookresearch/mae.")
  args = parser.parse_args(argv)
  problem = repo_problem(args.mae_repo)
  if problem:
    parser.error(problem)
  results = run(args.mae_repo)
  for r in results:
    figures = ", ".join(f"{k} {v:.1e}" for k, v in r.items() if isinstance(v, float))
    print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['case']}: {figures}")
  summary = dict(ok=all(r["ok"] for r in results), tolerance=TOLERANCE, cases=results)
  print(json.dumps(summary))
  sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
  main()
