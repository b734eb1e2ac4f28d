"""What pretraining learns while it runs: a weighted kNN classifier on the encoder's features.

Every `config.monitor.every_steps` the encoder, without masking, embeds a labeled dataset's
train split (or a subset of it) and its evaluation split; each evaluation image is classified
by a vote of its k nearest train images under cosine similarity, each vote weighted by
exp(similarity / temperature): the weighted kNN of DINO's evaluation (Caron et al. 2021,
"Emerging Properties in Self-Supervised Vision Transformers", Sec. 4.1 and its eval_knn.py,
k = 20, temperature 0.07). The top-1 accuracy (percent) goes to metrics.jsonl as `knn_top1`.

Everything runs on the job's mesh: batches are split over the devices (and processes), the train
features stay on the devices as one global array, and each evaluation batch is compared with all
of them there, so a multi-host job needs no host-side gathering and every process computes the
same figure.
"""

import functools
import time
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mae_jax import config_checks

Params = Dict[str, Any]
# Which encoder output is the feature: the cls token (what the paper's linear probe uses) or the
# mean of the patch tokens (what fine-tuning's global pool averages), both after encoder_norm.
FEATURES = config_checks.MONITOR_FEATURES


# --- the classifier (pure) ------------------------------------------------------------------

def knn_votes(train_features: jax.Array, train_labels: jax.Array, test_features: jax.Array, *,
              num_classes: int, k: int = 20, temperature: float = 0.07,
              train_valid: Optional[jax.Array] = None) -> jax.Array:
  """Weighted kNN class scores float32 [M, num_classes], as DINO's eval_knn.py computes them.

  Args:
    train_features: [N, D] (any float dtype; L2-normalized here).
    train_labels: int [N] in [0, num_classes).
    test_features: [M, D].
    num_classes: number of classes C.
    k: neighbours per test example (at most N are used).
    temperature: T in each neighbour's weight exp(cos / T).
    train_valid: bool [N]; rows that are False (padding) are never neighbours.

  Returns:
    scores[i, c] = sum of exp(cos(test_i, train_j) / T) over the k train rows j most similar to
    test_i (cosine similarity) whose label is c. The prediction is the argmax.
  """
  def unit(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

  similarity = jnp.matmul(unit(test_features), unit(train_features).T,
                          precision=jax.lax.Precision.HIGHEST)
  if train_valid is not None:
    similarity = jnp.where(train_valid[None, :], similarity, -jnp.inf)
  top, index = jax.lax.top_k(similarity, min(k, train_features.shape[0]))
  weights = jnp.exp(top / temperature)  # padding: exp(-inf) = 0
  votes = jax.nn.one_hot(train_labels[index], num_classes, dtype=jnp.float32)
  return jnp.sum(votes * weights[..., None], axis=1)


def knn_hits(train_features: jax.Array, train_labels: jax.Array, train_valid: jax.Array,
             test_features: jax.Array, test_labels: jax.Array, test_valid: jax.Array, *,
             num_classes: int, k: int, temperature: float) -> Tuple[jax.Array, jax.Array]:
  """(correct top-1 predictions, valid test examples) of one test batch, float32 scalars."""
  scores = knn_votes(train_features, train_labels, test_features, num_classes=num_classes, k=k,
                     temperature=temperature, train_valid=train_valid)
  hit = (jnp.argmax(scores, axis=-1) == test_labels) & test_valid
  return jnp.sum(hit, dtype=jnp.float32), jnp.sum(test_valid, dtype=jnp.float32)


# --- features -------------------------------------------------------------------------------

def feature_fn(model: Any, feature: str = "cls") -> Callable[[Params, jax.Array], jax.Array]:
  """(params, images [B, H, W, C] normalized) -> float32 features [B, D] of `model`.

  A `MaskedAutoencoder` encodes every patch (mask ratio 0) and gives the cls token or the mean
  of the patch tokens (`feature`, one of FEATURES), after encoder_norm; a fine-tuning
  `VisionTransformer` gives what its head sees (`features`), whatever `feature` says.
  """
  from mae_jax.models import MaskedAutoencoder  # pylint: disable=g-import-not-at-top
  from mae_jax.models.classifier import VisionTransformer  # pylint: disable=g-import-not-at-top
  if feature not in FEATURES:
    raise ValueError(f"feature={feature!r} is not one of {FEATURES}.")
  if isinstance(model, VisionTransformer):
    return lambda params, images: model.apply(
        {"params": params}, images, method=VisionTransformer.features).astype(jnp.float32)
  if not isinstance(model, MaskedAutoencoder):
    raise TypeError(f"Features of a {type(model).__name__}: expected a MaskedAutoencoder or "
                    f"a VisionTransformer.")

  def features(params, images):
    from mae_jax.models import num_patches  # pylint: disable=g-import-not-at-top
    # Zero noise keeps the patches in order; with nothing removed the order does not matter.
    noise = jnp.zeros((images.shape[0], num_patches(model.img_size, model.patch_size)),
                      jnp.float32)
    latent, _, _ = model.apply({"params": params}, images, mask_ratio=0.0, noise=noise,
                               method=MaskedAutoencoder.encode)
    pooled = latent[:, 0] if feature == "cls" else latent[:, 1:].mean(axis=1)
    return pooled.astype(jnp.float32)

  return features


class Embedded(NamedTuple):
  """Features of (part of) a pass over a dataset split, global arrays on the mesh: `features`
  float32 [N, D], `labels` int32 [N], `valid` bool [N] (False for the padding of the last
  batch and for rows past a requested subset)."""
  features: jax.Array
  labels: jax.Array
  valid: jax.Array


def split_batches(input_config: ml_collections.ConfigDict, *, image_size, split: str,
                  seed: int, max_examples: int = 0, channels: int = 3
                  ) -> Tuple[Iterator[Dict[str, np.ndarray]], int, int]:
  """(this process's batches of `split` with center crops, batches, examples in the pass).

  The whole split once, in order, when `max_examples` is 0 or at least its size; otherwise
  `max_examples` distinct records drawn at random (the input pipeline's epoch-0 order for
  `seed`), in ceil(max_examples / batch) batches whose rows past `max_examples` must be ignored.
  """
  from mae_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  source = input_pipeline.open_source(input_config, split)
  subset = 0 < max_examples < len(source)
  examples = max_examples if subset else len(source)
  batches = input_pipeline.create_iterator(
      input_config, image_size=image_size, seed=seed, train=subset, augment="eval",
      split=split, process_index=jax.process_index(), process_count=jax.process_count(),
      source=source, channels=channels)
  return batches, -(-examples // input_config.batch_size), examples


def embedded_batches(embed_fn: Callable[[Params, jax.Array], jax.Array], params: Params,
                     batches: Iterator[Dict[str, np.ndarray]], *, num_batches: int,
                     examples: int, sharding: NamedSharding,
                     progress: Optional[Callable[[int], None]] = None) -> Iterator[Embedded]:
  """Runs `embed_fn` (jitted, batch split over `sharding`'s devices) on `num_batches` of
  `batches` (closing them at the end) and yields each batch's features; rows past the first
  `examples` of the pass are not `valid`. `progress(examples done)` after each batch."""
  from mae_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  try:
    for i in range(num_batches):
      batch = next(batches)
      if "label" not in batch:
        raise ValueError("The kNN monitor and feature extraction need a labeled dataset; this "
                         "one has no labels (set config.monitor.dataset, or --dataset).")
      local = batch["image"].shape[0]
      rows = local * jax.process_count()
      # Stream position of each local row (process p holds rows p*B/P .. (p+1)*B/P - 1).
      position = i * rows + jax.process_index() * local + np.arange(local)
      valid = position < examples
      if "valid" in batch:
        valid &= batch["valid"]
      placed = input_pipeline.to_global({"image": batch["image"], "label": batch["label"],
                                         "valid": valid}, sharding)
      yield Embedded(embed_fn(params, placed["image"]), placed["label"], placed["valid"])
      if progress is not None:
        progress(min((i + 1) * rows, examples))
  finally:
    if hasattr(batches, "close"):
      batches.close()


@functools.lru_cache(maxsize=8)
def _concatenate_fn(sharding: NamedSharding) -> Callable[[List[Embedded]], Embedded]:
  return jax.jit(lambda parts: Embedded(*(jnp.concatenate(x, axis=0) for x in zip(*parts))),
                 out_shardings=sharding)


def concatenate(parts: List[Embedded], sharding: NamedSharding) -> Embedded:
  """One `Embedded` of all rows of `parts`, split over `sharding`'s devices."""
  return _concatenate_fn(sharding)(parts)


# --- the monitor ----------------------------------------------------------------------------

def monitor_input(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.input with the monitor's dataset, splits and batch size."""
  m = config.monitor
  c = config.input.copy_and_resolve_references()
  with c.unlocked():
    c.dataset = m.dataset or c.dataset
    c.split = m.train_split
    c.eval_split = m.eval_split
    c.batch_size = m.batch_size
    c.decoded_cache_mb = 0  # each pass sees every image once
  return c


class KnnMonitor:
  """`monitor(params)` -> {"knn_top1": percent, ...} of the encoder in `params`; every process
  calls it and gets the same figures.

  Built before training starts, so that a dataset without labels or a missing split stops the
  run before anything compiles. The train features of one evaluation stay on the devices
  ([N, D] float32 over all of them); the evaluation split is classified one batch at a time.
  """

  def __init__(self, config: ml_collections.ConfigDict, model: Any, mesh: jax.sharding.Mesh,
               batch_axes: Tuple[str, ...]):
    from mae_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    m = config.monitor
    self._config, self._model = config, model
    self._input = monitor_input(config)
    self.num_classes = input_pipeline.open_source(self._input).num_classes
    if self.num_classes is None:
      raise ValueError(f"config.monitor.dataset={self._input.dataset!r} has no labels; the kNN "
                       f"monitor needs a labeled dataset (e.g. sklearn_digits, imagenet2012), "
                       f"or config.monitor.every_steps=0 to turn it off.")
    self._eval_split = input_pipeline.default_eval_split(self._input)
    input_pipeline.open_source(self._input, self._eval_split)  # fails now if it is missing
    self.eval_name = f"{self._input.dataset}[{self._eval_split}]"
    self._sharding = NamedSharding(mesh, P(batch_axes))
    self._embed = jax.jit(feature_fn(model, m.feature), out_shardings=self._sharding)
    replicated = NamedSharding(mesh, P())

    def hits(bank, test):
      correct, count = knn_hits(bank.features, bank.labels, bank.valid, test.features,
                                test.labels, test.valid, num_classes=self.num_classes, k=m.k,
                                temperature=m.temperature)
      return correct, count, jnp.sum(bank.valid, dtype=jnp.float32)

    self._hits = jax.jit(hits, out_shardings=replicated)

  def due(self, step: int, total: int) -> bool:
    """Whether the loop runs the monitor after `step`: 0, every config.monitor.every_steps,
    and the last step."""
    return step % self._config.monitor.every_steps == 0 or step == total

  def write(self, step: int, params: Params, writer: Any) -> Dict[str, float]:
    """Runs the monitor, logs the figure and writes its row with `writer` (a
    writers.MetricWriter: metrics.jsonl and TensorBoard, on process 0)."""
    m = self._config.monitor
    row = self(params)
    logging.info("step %d: kNN top-1 %.2f%% (k=%d: %d %s images classified by %d neighbours "
                 "from %s) in %.1f s.", step, row["knn_top1"], m.k, row["knn_eval"],
                 self.eval_name, row["knn_train"], m.train_split, row["knn_s"])
    writer.write_scalars(step, row)
    return row

  def __call__(self, params: Params) -> Dict[str, float]:
    """{"knn_top1": percent, "knn_train": neighbours, "knn_eval": examples classified,
    "knn_s": seconds this took}."""
    m = self._config.monitor
    start = time.time()

    def batches(split, max_examples=0):
      it, n, examples = split_batches(self._input, image_size=self._model.img_size,
                                      split=split, seed=self._config.seed,
                                      max_examples=max_examples, channels=self._model.in_chans)
      return embedded_batches(self._embed, params, it, num_batches=n, examples=examples,
                              sharding=self._sharding)

    bank = concatenate(list(batches(m.train_split, m.train_examples)), self._sharding)
    correct = count = 0.0
    neighbours = 0.0
    for test in batches(self._eval_split):
      c, n, neighbours = jax.device_get(self._hits(bank, test))
      correct, count = correct + c, count + n
    return {"knn_top1": float(100.0 * correct / max(count, 1.0)), "knn_train": int(neighbours),
            "knn_eval": int(count), "knn_s": time.time() - start}


def create(config: ml_collections.ConfigDict, model: Any, mesh: jax.sharding.Mesh,
           batch_axes: Tuple[str, ...]) -> Optional["KnnMonitor"]:
  """The monitor of `config.monitor` for the pretraining loop, or None when it is off."""
  m = config.get("monitor")
  return KnnMonitor(config, model, mesh, batch_axes) if m is not None and m.every_steps else None
