"""Training step by step against the official training semantics in PyTorch (float32).

The official repository is not a package, so its training recipe is restated here around
transformers' models with the same random weights, images and masking noise:
- pretraining (main_pretrain.py + engine_pretrain.py): ViTMAEForPreTraining, torch AdamW
  (0.9, 0.95) over timm's add_weight_decay groups, the lr set before every update as
  util/lr_sched.adjust_learning_rate does (from the fractional epoch of the micro-batch
  iteration), gradient accumulation as engine_pretrain does it (loss / accum_iter, an update
  every accum_iter micro-batches);
- fine-tuning (main_finetune.py): the models_vit classifier, AdamW over
  util/lr_decay.param_groups_lrd's layer-decay groups, label smoothing, mixup / cutmix, RandAugment,
  random erasing and drop path off (they draw random numbers that torch and JAX cannot share);
- linear probing (main_linprobe.py): frozen encoder, BatchNorm1d(affine=False) + Linear head,
  util/lars.py's LARS.
Per-step losses and every param after N updates agree within 1e-4 (relative to the param's
largest magnitude); each param's total change within 1e-3 of the largest change, so that the
comparison tests the updates and not only the starting point.

Left out: the attention key bias. Its true gradient is 0 (softmax ignores a shift shared by all
keys), so both sides hold rounding noise there, which AdamW divides by its own root mean
square: the two updates are unrelated noise of size lr, on either side.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mae_jax import augment
from mae_jax import config_lib
from mae_jax import finetune
from mae_jax import models
from mae_jax import train
from mae_jax.convert import params_from_torch, params_to_torch
from torch_tools import ViTClassifier, official_name, official_state_dict, randomize, vitmae

PARAM_RTOL = 1e-4    # every param after N updates, relative to its largest magnitude
UPDATE_RTOL = 1e-3   # each param's change over the N updates, relative to its largest change
LOSS_RTOL = 1e-4
# (img, patch, width, depth, heads, decoder width, decoder depth, decoder heads)
SHAPE = (32, 8, 64, 2, 2, 32, 2, 4)
BATCH, STEPS_PER_EPOCH, STEPS = 8, 2, 6
SCHEDULE = dict(num_epochs=4, warmup_epochs=1)  # warmup (lr 0 at the first update), then cosine


def official_lr(epoch: float, lr: float, min_lr: float) -> float:
  """util/lr_sched.adjust_learning_rate at a fractional epoch."""
  warmup, epochs = SCHEDULE["warmup_epochs"], SCHEDULE["num_epochs"]
  if epoch < warmup:
    return lr * epoch / warmup
  return min_lr + (lr - min_lr) * 0.5 * (1.0 + np.cos(np.pi * (epoch - warmup) / (epochs - warmup)))


def timm_add_weight_decay(model: torch.nn.Module, weight_decay: float) -> list:
  """main_pretrain.py's groups: no decay on 1-D params and biases; frozen params left out."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if p.requires_grad:
      (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
  return [{"params": no_decay, "weight_decay": 0.0},
          {"params": decay, "weight_decay": weight_decay}]


def param_groups_lrd(model: torch.nn.Module, weight_decay: float, layer_decay: float,
                     depth: int) -> list:
  """main_finetune.py's groups (util/lr_decay.py) over the official names: layer id 0 for the
  patch embedding and tokens, i + 1 for block i, depth + 1 for the rest; lr scale
  layer_decay ** (depth + 1 - id); no decay on 1-D params and on no_weight_decay()'s tokens."""
  groups = {}
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    name = official_name(name)
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
      layer = 0
    elif name.startswith("blocks."):
      layer = int(name.split(".")[1]) + 1
    else:
      layer = depth + 1
    decay = not (p.ndim == 1 or name in ("cls_token", "pos_embed"))
    group = groups.setdefault((layer, decay), {
        "params": [], "weight_decay": weight_decay if decay else 0.0,
        "lr_scale": layer_decay ** (depth + 1 - layer)})
    group["params"].append(p)
  return list(groups.values())


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
  for group in optimizer.param_groups:
    group["lr"] = lr * group.get("lr_scale", 1.0)


class Lars(torch.optim.Optimizer):
  """util/lars.py: for params with more than one dimension the decayed gradient is scaled by
  trust * |p| / |g| (1 where a norm is 0); heavy-ball momentum; the lr applied last."""

  def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
    super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                  trust_coefficient=trust_coefficient))

  @torch.no_grad()
  def step(self):
    for group in self.param_groups:
      for p in group["params"]:
        if p.grad is None:
          continue
        g = p.grad
        if p.ndim > 1:
          g = g + group["weight_decay"] * p
          p_norm, g_norm = torch.linalg.norm(p), torch.linalg.norm(g)
          ratio = group["trust_coefficient"] * p_norm / g_norm
          g = g * torch.where((p_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
        mu = self.state[p].setdefault("mu", torch.zeros_like(p))
        mu.mul_(group["momentum"]).add_(g)
        p.add_(mu, alpha=-group["lr"])


def run_official(model, optimizer, loss_fn, batches, *, accum: int, lr: float, min_lr: float):
  """engine_pretrain / engine_finetune's loop over `batches` (each split into `accum`
  micro-batches as mae_jax splits them: micro-batch j takes examples j, j + accum, ...).
  Returns the per-update mean of the micro-batch losses."""
  model.train()
  losses, iteration, per_epoch = [], 0, STEPS_PER_EPOCH * accum  # len(data_loader)
  optimizer.zero_grad()
  for batch in batches:
    micro_losses = []
    for j in range(accum):
      if iteration % accum == 0:
        set_lr(optimizer, official_lr(iteration / per_epoch, lr, min_lr))
      loss = loss_fn(*(x[j::accum] for x in batch))
      micro_losses.append(loss.item())
      (loss / accum).backward()
      if (iteration + 1) % accum == 0:
        optimizer.step()
        optimizer.zero_grad()
      iteration += 1
    losses.append(np.mean(micro_losses))
  return losses


def assert_params_close(got: dict, want: dict, start: dict) -> None:
  """Official-key state dicts after training (`got` mae_jax's), with the key-bias third of every
  qkv bias left out; `start` the common starting point."""
  assert set(got) == set(want), set(got) ^ set(want)
  for key in sorted(got):
    a, b, b0 = (np.asarray(x[key], np.float64) for x in (got, want, start))
    if key.endswith("attn.qkv.bias"):
      d = a.shape[0] // 3
      a, b, b0 = (np.delete(x, np.s_[d:2 * d]) for x in (a, b, b0))
    change = np.abs(b - b0).max()
    assert change > 0, f"{key} did not train"
    err = np.abs(a - b).max()
    assert err <= PARAM_RTOL * np.abs(b).max(), (key, err, np.abs(b).max())
    assert err <= UPDATE_RTOL * change, (key, err, change)


def _mesh():
  return jax.make_mesh((1, 1), train.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _copy(sd: dict) -> dict:
  return {k: np.array(v) for k, v in sd.items()}


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


# --- pretraining --------------------------------------------------------------------------------

@pytest.mark.parametrize("accum", [1, 2])
def test_pretraining_steps_match_official_training(accum):
  img, patch, width, depth, heads, dwidth, ddepth, dheads = SHAPE
  hf = vitmae(*SHAPE, norm_pix=True)
  c = config_lib.pretrain_config("vit_b")
  c.model = config_lib.model_config(
      "vit_b", img_size=img, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
      decoder_embed_dim=dwidth, decoder_depth=ddepth, decoder_num_heads=dheads,
      norm_pix_loss=True, dtype="float32")
  c.input.batch_size = BATCH
  c.optimizer.blr = 0.032  # lr = blr * 8 / 256 = 1e-3
  c.optimizer.grad_accum_steps = accum
  c.update(SCHEDULE)
  mesh = _mesh()
  model = models.from_config(c.model)
  lr = train.create_learning_rate_fn(c, STEPS_PER_EPOCH)
  tx = train.create_optimizer(c, lr)
  abstract = train.abstract_train_state(model, tx, c.seed, mesh)
  start = _copy(official_state_dict(hf))
  params = params_from_torch(start)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params),
                           rng=jax.random.key_data(jax.random.key(c.seed)))
  state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, abstract))
  step = train.jit_train_step(c, model, tx, lr, abstract, mesh)

  rng = np.random.default_rng(0)
  batches, losses = [], []
  for k in range(STEPS):
    images = rng.normal(size=(BATCH, img, img, 3)).astype(np.float32)
    # The same masking noise on both sides: the one mae_jax's step draws for this step.
    noise = np.array(train.masking_noise(state.rng, k, BATCH, (img // patch)**2))
    batches.append((_nchw(images), torch.from_numpy(noise)))
    state, metrics = step(state, jnp.asarray(images))
    losses.append(float(metrics["loss"]))

  optimizer = torch.optim.AdamW(timm_add_weight_decay(hf, c.optimizer.weight_decay),
                                lr=0.0, betas=(c.optimizer.b1, c.optimizer.b2), eps=1e-8)
  want = run_official(hf, optimizer, lambda x, noise: hf(pixel_values=x, noise=noise).loss,
                      batches, accum=accum, lr=c.optimizer.blr * BATCH / 256, min_lr=0.0)
  np.testing.assert_allclose(losses, want, rtol=LOSS_RTOL)
  trained = {k: v for k, v in official_state_dict(hf).items() if "pos_embed" not in k}
  start = {k: v for k, v in start.items() if "pos_embed" not in k}
  assert_params_close(params_to_torch(state.params), trained, start)


# --- fine-tuning and linear probing -------------------------------------------------------------

NUM_CLASSES = 5


def _classifier_config(mode: str, accum: int):
  img, patch, width, depth, heads = SHAPE[:5]
  c = config_lib.finetune_config("vit_b") if mode == "finetune" else (
      config_lib.linprobe_config("vit_b"))
  fields = dict(img_size=img, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
                num_classes=NUM_CLASSES, drop_path=0.0, dtype="float32")
  c.model.update(fields)
  c.input.batch_size = BATCH
  c.optimizer.grad_accum_steps = accum
  c.update(SCHEDULE)
  if mode == "finetune":
    c.optimizer.blr = 0.032  # lr 1e-3
    c.optimizer.min_lr = 1e-4
    c.augment.update(dict(rand_augment="", reprob=0.0, mixup=0.0, cutmix=0.0))
  else:
    c.optimizer.blr = 3.2  # lr 0.1
    c.optimizer.weight_decay = 0.05  # (the recipe's 0; here the decay path is exercised too)
  return c


def _jax_classifier(c, params):
  model = finetune.create_model(c)
  shapes = jax.eval_shape(functools.partial(finetune.init_state, model, finetune.optax.identity(),
                                            c.seed, c.mode)).params
  lr = train.create_learning_rate_fn(c, STEPS_PER_EPOCH)
  tx = finetune.create_optimizer(c, finetune.trainable(shapes, c.mode), lr)
  width = c.model.embed_dim
  # BatchNorm's running statistics start as torch's do (and flax's): mean 0, variance 1.
  stats = ({"head_norm": {"mean": jnp.zeros(width), "var": jnp.ones(width)}}
           if c.mode == "linprobe" else {})
  state = finetune.FinetuneState(
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state=tx.init(finetune.trainable(params, c.mode)), batch_stats=stats,
      rng=jax.random.key_data(jax.random.key(c.seed)))
  step = jax.jit(functools.partial(finetune.train_step, model=model, tx=tx, learning_rate=lr,
                                   **finetune.step_options(c)))
  return state, step


@pytest.mark.parametrize("global_pool,accum", [(True, 1), (False, 2)])
def test_finetuning_steps_match_official_training(global_pool, accum):
  img, patch, width, depth, heads = SHAPE[:5]
  c = _classifier_config("finetune", accum)
  c.model.global_pool = global_pool
  ref = ViTClassifier(img, patch, width, depth, heads, NUM_CLASSES, global_pool=global_pool)
  randomize(ref, seed=2)
  start = {k: v for k, v in _copy(official_state_dict(ref)).items()
           if not (global_pool and k.startswith("norm."))}  # the unused final norm
  state, step = _jax_classifier(c, params_from_torch(start))

  rng = np.random.default_rng(0)
  batches, losses = [], []
  for _ in range(STEPS):
    pixels = rng.integers(0, 256, (BATCH, img, img, 3)).astype(np.uint8)
    labels = rng.integers(0, NUM_CLASSES, BATCH)
    images = np.asarray(augment.from_pixels(pixels))
    batches.append((_nchw(images), torch.from_numpy(labels)))
    state, metrics = step(state, jnp.asarray(pixels), jnp.asarray(labels, jnp.int32))
    losses.append(float(metrics["loss"]))

  o = c.optimizer
  optimizer = torch.optim.AdamW(param_groups_lrd(ref, o.weight_decay, o.layer_decay, depth),
                                lr=0.0, betas=(o.b1, o.b2), eps=1e-8)
  criterion = torch.nn.CrossEntropyLoss(label_smoothing=c.augment.smoothing)
  want = run_official(ref, optimizer, lambda x, y: criterion(ref(x), y), batches, accum=accum,
                      lr=o.blr * BATCH / 256, min_lr=o.min_lr)
  np.testing.assert_allclose(losses, want, rtol=LOSS_RTOL)
  trained = {k: official_state_dict(ref)[k] for k in start}
  assert_params_close(params_to_torch(state.params), trained, start)


@pytest.mark.parametrize("accum", [1, 2])
def test_linear_probing_steps_match_official_training(accum):
  img, patch, width, depth, heads = SHAPE[:5]
  c = _classifier_config("linprobe", accum)
  ref = ViTClassifier(img, patch, width, depth, heads, NUM_CLASSES, global_pool=False,
                      head_batchnorm=True)
  randomize(ref, seed=3)
  sd = _copy(official_state_dict(ref))
  bn = {k: sd.pop(k) for k in list(sd) if k.startswith("head.0.")}
  assert set(bn) == {"head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked"}
  sd["head.weight"], sd["head.bias"] = sd.pop("head.1.weight"), sd.pop("head.1.bias")
  state, step = _jax_classifier(c, params_from_torch(sd))

  rng = np.random.default_rng(0)
  batches, losses = [], []
  for _ in range(STEPS):
    images = rng.normal(size=(BATCH, img, img, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, BATCH)
    batches.append((_nchw(images), torch.from_numpy(labels)))
    state, metrics = step(state, jnp.asarray(images), jnp.asarray(labels, jnp.int32))
    losses.append(float(metrics["loss"]))

  # main_linprobe.py: everything frozen but the head; LARS over the head's params.
  for p in ref.parameters():
    p.requires_grad_(False)
  ref.head.requires_grad_(True)
  o = c.optimizer
  optimizer = Lars(ref.head.parameters(), weight_decay=o.weight_decay, momentum=o.momentum,
                   trust_coefficient=o.trust_coefficient)
  criterion = torch.nn.CrossEntropyLoss()
  # BatchNorm1d keeps the unbiased variance of each micro-batch in its running variance, flax's
  # BatchNorm the biased one: the reference also tracks the biased one, to compare with.
  biased_var = [torch.ones(width)]

  def loss_fn(x, y):
    features = ref.features(x)
    biased_var[0] = 0.9 * biased_var[0] + 0.1 * features.detach().var(dim=0, unbiased=False)
    return criterion(ref.head(features), y)

  want = run_official(ref, optimizer, loss_fn, batches, accum=accum, lr=o.blr * BATCH / 256,
                      min_lr=o.min_lr)
  np.testing.assert_allclose(losses, want, rtol=LOSS_RTOL)
  head = ref.head[1]
  trained = {"head.weight": head.weight.detach().numpy(), "head.bias": head.bias.detach().numpy()}
  got = params_to_torch({"embedding": state.params["embedding"], "cls": state.params["cls"],
                         "head": state.params["head"]})
  assert_params_close({k: got[k] for k in trained}, trained,
                      {k: sd[k] for k in trained})
  # The frozen encoder did not move.
  np.testing.assert_array_equal(params_to_torch(state.params)["blocks.0.mlp.fc1.weight"],
                                sd["blocks.0.mlp.fc1.weight"])
  stats = state.batch_stats["head_norm"]
  np.testing.assert_allclose(stats["mean"], ref.head[0].running_mean.numpy(), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(stats["var"], biased_var[0].numpy(), rtol=1e-4)
