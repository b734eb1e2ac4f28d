"""Pretraining input pipeline against the official code's PIL pipeline: same files, same cores.

Writes ImageNet-like JPEGs (about 500x375, quality 90) cut from scikit-image's sample photos,
then alternates timed rounds of
  - mae_jax.input_pipeline: create_iterator on "folder:DIR" (RandomResizedCrop 224, scale
    0.2-1, bicubic, flip, ImageNet normalization), `--workers` worker processes;
  - the official main_pretrain.py transform in a torch DataLoader with as many workers: PIL
    decode of the whole image, torchvision's RandomResizedCrop (crop, then bicubic resize),
    horizontal flip, ToTensor, Normalize (written out here: torchvision is not a dependency).
Per core = images per CPU second of the pipeline's processes (the main one and its workers),
counted between moments when all prefetch buffers are full, so it holds on a busy machine;
img_per_s is wall-clock throughput with all workers, which does not.

    python -m mae_jax.benchmarks.input_pipeline [--workers=N] [--batches=N] [--rounds=N]

Last line: one JSON object with img_per_s_per_core, pil_img_per_s_per_core, ratio and the setup.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any, Iterator

import numpy as np
from PIL import Image
import psutil
import skimage.io

from mae_jax import config_lib
from mae_jax import input_pipeline
from mae_jax import sample_photos


def write_jpegs(folder: str, count: int, seed: int = 0, quality: int = 90) -> list[str]:
  """`count` 500x375 (a fifth 375x500) JPEGs: random crops of the shipped colour photos."""
  photos = [skimage.io.imread(sample_photos.photo_path(n))[..., :3]
            for n in sample_photos.TRAIN_FILES + sample_photos.TEST_FILES]
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(count):
    photo = photos[i % len(photos)]
    size = (375, 500) if i % 5 == 4 else (500, 375)
    h, w = photo.shape[:2]
    # A random crop of 60-100% of the largest box of the target's aspect ratio.
    fit = min(w / size[0], h / size[1]) * rng.uniform(0.6, 1.0)
    cw, ch = size[0] * fit, size[1] * fit
    left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    image = Image.fromarray(photo).resize(size, Image.BICUBIC,
                                          box=(left, top, left + cw, top + ch))
    paths.append(os.path.join(folder, f"{i:05d}.jpg"))
    image.save(paths[-1], format="JPEG", quality=quality)
  return paths


class OfficialTransformDataset:
  """main_pretrain.py's transform_train on PIL images, as a torch map-style dataset."""

  def __init__(self, paths: list[str], size: int):
    self.paths, self.size = paths, size
    self.mean = np.asarray(input_pipeline.IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
    self.std = np.asarray(input_pipeline.IMAGENET_STD, np.float32).reshape(3, 1, 1)

  def __len__(self) -> int:
    # Many passes in one epoch: an epoch end drains the DataLoader's prefetch, which the
    # timing windows would misread (mae_jax's stream has no epoch ends).
    return len(self.paths) * 1000

  def __getitem__(self, index: int):
    import torch  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng()  # fresh entropy: the official code's crops are not seeded
    with open(self.paths[index % len(self.paths)], "rb") as f:
      image = Image.open(f).convert("RGB")  # torchvision's pil_loader
    left, top, w, h = input_pipeline.random_resized_crop_box(
        rng, image.width, image.height, (0.2, 1.0), (3 / 4, 4 / 3))
    image = image.crop((left, top, left + w, top + h)).resize((self.size, self.size),
                                                               Image.BICUBIC)
    if rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    tensor = torch.from_numpy(np.array(image, np.uint8, copy=True))
    tensor = tensor.permute(2, 0, 1).contiguous().float().div(255)
    return tensor.sub_(torch.from_numpy(self.mean)).div_(torch.from_numpy(self.std))


def pil_batches(paths: list[str], size: int, batch_size: int, workers: int) -> Iterator[Any]:
  """Batches (a thousand passes over the files) of the official transform in a DataLoader."""
  import torch  # pylint: disable=g-import-not-at-top
  loader = torch.utils.data.DataLoader(
      OfficialTransformDataset(paths, size), batch_size=batch_size, shuffle=True,
      num_workers=workers, drop_last=True)
  return iter(loader)


def mae_jax_batches(folder: str, size: int, batch_size: int, workers: int) -> Iterator[Any]:
  """Endless batches from mae_jax.input_pipeline on the same folder."""
  c = config_lib.pretrain_config("vit_b").input
  c.dataset = f"folder:{folder}"
  c.batch_size = batch_size
  c.num_workers = workers
  c.prefetch = 2 * max(1, workers)  # as deep as the DataLoader's default prefetch_factor 2
  return input_pipeline.create_iterator(c, image_size=size, seed=0, train=True,
                                        process_index=0, process_count=1)


def _cpu_seconds(pids: list[int]) -> float:
  """CPU time of this process (all threads) plus that of the given worker processes."""
  total = time.process_time()
  for pid in pids:
    times = psutil.Process(pid).cpu_times()
    total += times.user + times.system
  return total


def _settle(pids: list[int]) -> None:
  """Waits until the workers stop working (their prefetch buffers are full again)."""
  before = _cpu_seconds(pids)
  while True:
    time.sleep(0.3)
    now = _cpu_seconds(pids)
    if now - before < 0.01:
      return
    before = now


def timed_window(batches, pids: list[int], count: int, skip: int, batch_size: int
                 ) -> tuple[float, float]:
  """(images per wall second, images per CPU second over this process and `pids`).

  Buffers are full at the start and, after settling, at the end: the CPU time counted is
  exactly the work for the `skip + count` batches consumed, whatever else runs on the
  machine. The wall clock starts after `skip` batches, which empty the prefetch buffers.
  """
  _settle(pids)
  cpu = _cpu_seconds(pids)
  for _ in range(skip):
    next(batches)
  wall = time.perf_counter()
  for _ in range(count):
    next(batches)
  wall = time.perf_counter() - wall
  _settle(pids)
  cpu = _cpu_seconds(pids) - cpu
  return count * batch_size / wall, (skip + count) * batch_size / cpu


def _new_children(known: set[int]) -> list[int]:
  return [c.pid for c in psutil.Process().children(recursive=True) if c.pid not in known]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  cores = len(os.sched_getaffinity(0))
  parser.add_argument("--workers", type=int, default=cores, help="worker processes per pipeline")
  parser.add_argument("--num_files", type=int, default=512)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--batches", type=int, default=8, help="timed batches per round")
  parser.add_argument("--warmup", type=int, default=4, help="untimed batches (worker start)")
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as folder:
    paths = write_jpegs(folder, args.num_files)
    pipelines = {}
    for name, make in (("mae_jax", mae_jax_batches), ("pil", pil_batches)):
      known = {c.pid for c in psutil.Process().children(recursive=True)}
      batches = make(folder if name == "mae_jax" else paths, args.image_size, args.batch_size,
                     args.workers)
      for _ in range(args.warmup):
        next(batches)
      pipelines[name] = (batches, _new_children(known))
    wall, per_cpu = {n: [] for n in pipelines}, {n: [] for n in pipelines}
    for r in range(args.rounds):
      for name, (batches, pids) in pipelines.items():
        w, c = timed_window(batches, pids, args.batches, 2 * args.workers, args.batch_size)
        wall[name].append(w)
        per_cpu[name].append(c)
        print(f"round {r}: {name:8s} {w:7.1f} images/s, {c:6.1f} images per CPU second",
              flush=True)
    pipelines["mae_jax"][0].close()
    del pipelines  # the DataLoader's workers stop with its iterator

  # Each round's two windows ran back to back, under about the same load: the ratio is the
  # median of per-round ratios.
  ratios = [a / b for a, b in zip(per_cpu["mae_jax"], per_cpu["pil"])]
  print(json.dumps({
      "img_per_s_per_core": round(statistics.median(per_cpu["mae_jax"]), 1),
      "pil_img_per_s_per_core": round(statistics.median(per_cpu["pil"]), 1),
      "ratio": round(statistics.median(ratios), 3),
      "img_per_s": round(statistics.median(wall["mae_jax"]), 1),
      "pil_img_per_s": round(statistics.median(wall["pil"]), 1),
      "cores": cores, "workers": args.workers, "batch_size": args.batch_size,
      "image_size": args.image_size, "num_files": args.num_files, "jpeg": "500x375 q90",
      "rounds": args.rounds, "batches_per_round": args.batches,
  }))


if __name__ == "__main__":
  main()
