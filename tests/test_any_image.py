"""Any image through the whole pipeline: non-square sizes, grayscale and multispectral bands,
per-channel normalization, and pretraining on each."""

import io
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
import tifffile
from PIL import Image

from mae_jax import config_lib
from mae_jax import input_pipeline as ip
from mae_jax import stats
from mae_jax import visualize
from mae_jax.input_pipeline import decode

REPO = pathlib.Path(__file__).parent.parent


def _input(folder, **overrides):
  c = config_lib.pretrain_config("vit_b").input
  c.dataset = f"folder:{folder}"
  c.batch_size = 4
  c.num_workers = 0
  c.update(overrides)
  return c


def _photo(width, height, seed):
  photo = np.roll(skimage.data.astronaut(), 37 * seed, axis=1)
  return np.asarray(Image.fromarray(photo).resize((width, height), Image.BICUBIC))


@pytest.fixture(scope="module")
def grey_folder(tmp_path_factory):
  """Grayscale PNGs and JPEGs of several sizes and aspects, in two classes."""
  root = tmp_path_factory.mktemp("grey")
  for i, (w, h) in enumerate([(90, 60), (20, 13), (64, 100), (150, 150), (33, 70), (80, 45)]):
    (root / ("a" if i % 2 else "b")).mkdir(exist_ok=True)
    grey = _photo(w, h, i).mean(-1).astype(np.uint8)
    Image.fromarray(grey).save(root / ("a" if i % 2 else "b") / f"{i}.{'png' if i % 3 else 'jpg'}")
  return root


def _bands(w, h, seed, dtype=np.uint16):
  """4 bands: the photo's RGB and their mean, on a 0-10000 scale like reflectance data."""
  rgb = _photo(w, h, seed).astype(np.float32)
  return (np.concatenate([rgb, rgb.mean(-1, keepdims=True)], -1) * (10000 / 255)).astype(dtype)


@pytest.fixture(scope="module")
def npy_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("npy")
  for i, (w, h) in enumerate([(90, 60), (40, 70), (120, 80), (64, 64), (30, 20)]):
    np.save(root / f"{i}.npy", _bands(w, h, i))
  return root


@pytest.fixture(scope="module")
def tif_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("tif")
  for i, (w, h) in enumerate([(90, 60), (40, 70), (120, 80), (64, 64), (30, 20)]):
    tifffile.imwrite(root / f"{i}.tif", _bands(w, h, i, np.float32), photometric="minisblack",
                     planarconfig="contig")
  return root


def test_grayscale_non_square_folder_gives_one_channel_crops_as_official(grey_folder):
  c = _input(grey_folder, mean=(0.45,), std=(0.25,))
  batches = list(ip.create_iterator(c, image_size=(24, 40), seed=0, train=False, channels=1,
                                    split="train"))
  assert [b["image"].shape for b in batches] == [(4, 24, 40, 1)] * 2
  source = ip.open_source(c)
  for row in range(6):
    data, label = source.read(row)
    grey = np.asarray(Image.open(io.BytesIO(data)))
    want = decode.eval_resize_and_crop(grey[..., None], (24, 40), 0.875)
    got = batches[row // 4]["image"][row % 4]
    np.testing.assert_allclose(got, (want / 255.0 - 0.45) / 0.25, atol=1e-5)
    assert batches[row // 4]["label"][row % 4] == label
  train = next(ip.create_iterator(c, image_size=(24, 40), seed=0, train=True, channels=1))
  assert train["image"].shape == (4, 24, 40, 1) and np.isfinite(train["image"]).all()


def test_three_channel_defaults_refuse_other_channel_counts(grey_folder):
  with pytest.raises(ValueError, match=r"input.mean=\(0.485, 0.456, 0.406\) \(ImageNet's, the "
                     r"default\) .* config.model.in_chans=1: set --config.input.mean"):
    ip.create_iterator(_input(grey_folder), image_size=16, seed=0, train=True, channels=1)
  with pytest.raises(ValueError, match="input.std=.* must be > 0"):
    ip.validate(_input(grey_folder, mean=(0.5,), std=(0.0,)), channels=1)


@pytest.mark.parametrize("folder", ["npy_folder", "tif_folder"])
def test_band_folders_give_normalized_bands(folder, request):
  root = request.getfixturevalue(folder)
  mean, std = (5000.0, 4000.0, 3000.0, 4100.0), (2500.0, 2000.0, 2200.0, 2100.0)
  c = _input(root, mean=mean, std=std, batch_size=5)
  batch = next(ip.create_iterator(c, image_size=(16, 24), seed=0, train=False, channels=4,
                                  split="train"))
  assert batch["image"].shape == (5, 16, 24, 4) and batch["valid"].all()
  source = ip.open_source(c)
  for row in range(5):
    bands = decode.read_pixels(source.read(row)[0], channels=4)
    want = decode.eval_resize_and_crop(bands.astype(np.float32), (16, 24), 0.875)
    np.testing.assert_allclose(batch["image"][row], (want - mean) / np.asarray(std), rtol=1e-5,
                               atol=1e-5)
  raw = next(ip.create_iterator(c, image_size=(16, 24), seed=0, train=True, channels=4,
                                normalize=False))
  assert raw["image"].dtype == np.float32 and raw["image"].max() > 255  # the file's own units


def test_a_file_that_does_not_fit_stops_the_input_naming_it(npy_folder, tmp_path):
  for name in ("0.npy", "1.npy"):
    (tmp_path / name).write_bytes((npy_folder / name).read_bytes())
  np.save(tmp_path / "2.npy", _bands(30, 30, 0)[..., :3])
  c = _input(tmp_path, mean=(0.0,) * 4, std=(1.0,) * 4, batch_size=3)
  assert ip.first_file_mismatch(ip.open_source(c), 4) == ""  # the early check reads 0.npy
  with pytest.raises(decode.DatasetMismatch, match=r"2.npy has 3 channels, but "
                     r"config.model.in_chans=4: .* set --config.model.in_chans=3"):
    next(ip.create_iterator(c, image_size=16, seed=0, train=False, channels=4, split="train"))
  (tmp_path / "2.npy").unlink()
  np.save(tmp_path / "2.npy", _bands(30, 30, 0, np.uint8))
  with pytest.raises(decode.DatasetMismatch, match=r"2.npy decodes to uint8 values where the "
                     r"dataset's first file gave float32"):
    next(ip.create_iterator(c, image_size=16, seed=0, train=False, channels=4, split="train"))


@pytest.mark.parametrize("in_chans", [3, 1])
def test_a_folder_whose_files_do_not_fit_in_chans_fails_before_the_workdir_is_written(
    npy_folder, grey_folder, tmp_path, in_chans):
  # 4-band .npy files for the default 3 channels; colour pictures for a grayscale model. Before,
  # config.json, checkpoints/ and tensorboard/ were written and the first batch failed.
  from mae_jax import config_checks, train  # pylint: disable=g-import-not-at-top,g-multiple-import
  if in_chans == 1:  # grayscale files after a colour one
    (tmp_path / "data").mkdir()
    for path in grey_folder.glob("*/*"):
      (tmp_path / "data" / f"grey_{path.name}").write_bytes(path.read_bytes())
    Image.fromarray(_photo(30, 20, 0)).save(tmp_path / "data" / "colour.png")
  folder, first = (npy_folder, "0.npy") if in_chans == 3 else (tmp_path / "data", "colour.png")
  config = config_lib.pretrain_config("vit_b")
  config.model = config_lib.model_config("vit_b", img_size=16, patch_size=8, in_chans=in_chans,
                                         embed_dim=32, depth=1, num_heads=2,
                                         decoder_embed_dim=16, decoder_depth=1,
                                         decoder_num_heads=2)
  config.input = _input(folder, **({"mean": (0.5,), "std": (0.25,)} if in_chans == 1 else {}))
  config.total_steps, config.warmup_steps = 2, 1
  workdir = tmp_path / "run"
  with pytest.raises(config_checks.ConfigError) as e:
    train.train_and_evaluate(config, str(workdir))
  message = str(e.value)
  want = ([f"{first} has 4 channels, but config.model.in_chans=3",
           "set --config.model.in_chans=4, with 4 values in input.mean and input.std"]
          if in_chans == 3 else
          [f"{first} is a colour image (RGB), but config.model.in_chans=1",
           "set --config.model.in_chans=3 if the data is colour"])
  for text in [f"input.dataset='folder:{folder}'", *want]:
    assert text in message, message
  assert not workdir.exists()


def test_mixed_channel_counts_in_an_image_folder_stop_with_the_file(grey_folder, tmp_path):
  for path in grey_folder.glob("*/*"):
    (tmp_path / path.name).write_bytes(path.read_bytes())
  Image.fromarray(_photo(30, 20, 0)).save(tmp_path / "colour.png")
  c = _input(tmp_path, mean=(0.5,), std=(0.25,), batch_size=7)
  with pytest.raises(decode.DatasetMismatch, match="colour.png is a colour image"):
    next(ip.create_iterator(c, image_size=16, seed=0, train=False, channels=1, split="train"))


def test_stats_are_the_bands_mean_and_std_over_all_pixels(npy_folder):
  c = _input(npy_folder)
  result = stats.dataset_stats(c, channels=4)
  every = np.concatenate([np.load(p).reshape(-1, 4) for p in sorted(npy_folder.glob("*.npy"))])
  np.testing.assert_allclose(result["mean"], every.mean(0), rtol=1e-3)
  np.testing.assert_allclose(result["std"], every.std(0), rtol=1e-3)
  assert result["images"] == 5 and result["pixels"] == len(every) and result["skipped"] == 0
  assert stats.overrides(result).startswith("--config.input.mean='(")


def test_stats_of_files_that_do_not_fit_in_chans_is_one_error_line(npy_folder):
  result = subprocess.run(
      [sys.executable, "-m", "mae_jax.stats", f"--config={REPO}/configs/demo.py",
       f"--config.input.dataset=folder:{npy_folder}"], cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 1, result.stderr
  assert result.stderr.startswith("Error: ") and "Traceback" not in result.stderr
  assert "has 4 channels, but config.model.in_chans=3" in result.stderr


def _start_pretraining(workdir, *overrides):
  """Starts `python -m mae_jax.main` with a tiny model for 3 steps; `_rows` waits for it."""
  command = [sys.executable, "-m", "mae_jax.main", f"--config={REPO}/configs/demo.py",
             f"--workdir={workdir}", "--config.total_steps=3", "--config.warmup_steps=1",
             "--config.log_every_steps=1", "--config.reconstruction_every_steps=0",
             "--config.input.batch_size=4", "--config.input.num_workers=0",
             "--config.input.decoded_cache_mb=0", "--config.model.patch_size=8",
             "--config.model.embed_dim=32", "--config.model.depth=1",
             "--config.model.num_heads=2", "--config.model.decoder_embed_dim=16",
             "--config.model.decoder_depth=1", "--config.model.decoder_num_heads=2",
             *overrides]
  log = workdir.with_suffix(".log")  # a file, not a pipe: a full pipe would stall the run
  with open(log, "w") as f:
    return workdir, subprocess.Popen(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)


def _rows(run):
  """The metrics rows of a `_start_pretraining` run, once it has ended well."""
  workdir, process = run
  process.wait(timeout=600)
  assert process.returncode == 0, workdir.with_suffix(".log").read_text()[-3000:]
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_on_a_grayscale_non_square_folder_and_on_tif_bands(grey_folder, tif_folder,
                                                                      tmp_path):
  # The two runs at once: each compiles on one core most of its time.
  grey = _start_pretraining(tmp_path / "grey", f"--config.input.dataset=folder:{grey_folder}",
                            "--config.model.img_size=(24, 40)", "--config.model.in_chans=1",
                            "--config.input.mean=(0.45,)", "--config.input.std=(0.25,)")
  tif = _start_pretraining(tmp_path / "tif", f"--config.input.dataset=folder:{tif_folder}",
                           "--config.model.img_size=(16, 32)", "--config.model.in_chans=4",
                           "--config.input.mean=(5000, 4000, 3000, 4100)",
                           "--config.input.std=(2500, 2000, 2200, 2100)")
  try:
    rows, tif_rows = _rows(grey), _rows(tif)
  finally:  # neither outlives the test
    for _, process in (grey, tif):
      if process.poll() is None:
        process.kill()
  assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
  config = json.loads((tmp_path / "grey" / "config.json").read_text())
  assert config["model"]["img_size"] == [24, 40] and config["model"]["in_chans"] == 1
  figure = np.asarray(Image.open(tmp_path / "grey" / "reconstruction_00000003.png"))
  assert figure.ndim == 3 and (figure[..., 0] == figure[..., 2]).all()  # drawn in grey
  assert (figure != 255).any(axis=-1).any(axis=1).sum() > 4 * 24  # four rows of 24-px panels
  assert [r["step"] for r in tif_rows] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) for r in tif_rows)
  # Reconstructions of the first training files, bands 0-2 as RGB; then bands 3, 3, 3 (grey).
  default = np.asarray(Image.open(tmp_path / "tif" / "reconstruction_00000003.png"))
  assert not (default[..., 0] == default[..., 2]).all()
  png = visualize.render(str(tmp_path / "tif"), bands=[3], output=str(tmp_path / "b3.png"))
  grey = np.asarray(Image.open(png))
  assert grey.shape == default.shape and (grey[..., 0] == grey[..., 2]).all()
  with pytest.raises(ValueError, match=r"--bands=\[4\]: give 1 \(grey\) or 3"):
    visualize.render(str(tmp_path / "tif"), bands=[4], output=str(tmp_path / "b4.png"))


def test_rand_augment_keeps_geometric_ops_for_other_channel_counts():
  import jax  # pylint: disable=g-import-not-at-top
  from mae_jax import augment as A  # pylint: disable=g-import-not-at-top
  ft = config_lib.finetune_config("vit_b")
  assert A.rand_augment_problem(ft.augment, 3) == ""
  problem = A.rand_augment_problem(ft.augment, 1)
  assert "colour operations (AutoContrast, Equalize" in problem
  assert "--config.augment.rand_augment_ops=geometric" in problem
  ft.augment.rand_augment_ops = "geometric"
  assert A.rand_augment_problem(ft.augment, 4) == ""
  # On a grey image the geometric ops move each channel alike: one channel of the RGB result
  # is the 1-channel result.
  grey = _photo(40, 32, 0).mean(-1, keepdims=True).round().astype(np.float32)[None]
  rgb = np.repeat(grey, 3, axis=-1)
  policy = A.parse_rand_augment("rand-m9-mstd0.5-inc1", "geometric", (124,) * 3)
  one = A.parse_rand_augment("rand-m9-mstd0.5-inc1", "geometric", (124,))
  key = jax.random.key(3)
  out_rgb = np.asarray(A.rand_augment(key, rgb, policy))
  out_one = np.asarray(A.rand_augment(key, grey, one))
  assert out_one.shape == grey.shape and not np.array_equal(out_one, grey)
  np.testing.assert_array_equal(out_one[..., 0], out_rgb[..., 0])
  pair = np.concatenate([grey, grey]).astype(np.uint8)  # mixup pairs examples up
  ft.input.mean, ft.input.std = (0.5,), (0.25,)
  options = A.FinetuneAugment.from_config(ft.augment, ft.input)
  assert options.mean == (0.5,) and options.rand_augment_ops == "geometric"
  # Shapes only: traced (every op sees the one channel), not compiled and run.
  images, targets = jax.eval_shape(
      lambda: A.finetune_augment(key, pair, np.zeros(2, np.int32), 5, options))
  assert images.shape == pair.shape and targets.shape == (2, 5)
  ft.augment.rand_augment_ops = "all"
  with pytest.raises(ValueError, match="config.model.in_chans=1"):
    A.finetune_augment(key, pair, np.zeros(2, np.int32), 5,
                       A.FinetuneAugment.from_config(ft.augment, ft.input))


def test_rand_augment_on_float_bands_moves_values_unclipped_and_refuses_colour_ops():
  import jax  # pylint: disable=g-import-not-at-top
  from mae_jax import augment as A  # pylint: disable=g-import-not-at-top
  ft = config_lib.finetune_config("vit_b")
  problem = A.rand_augment_problem(ft.augment, 3, "float32", data="input.dataset='folder:x'")
  assert "input.dataset='folder:x' decodes to float32 values, not 8-bit levels" in problem
  assert "--config.augment.rand_augment_ops=geometric" in problem
  with pytest.raises(ValueError, match="float bands take the geometric ops only"):
    A.parse_rand_augment("rand-m9-mstd0.5-inc1", "all", (0.0,), uint8=False)
  # Reflectance-like bands (40x the grey levels, up to 10200): the geometric ops move them as
  # they move 8-bit levels, without clipping them at 255 or rounding them.
  grey = _photo(20, 16, 1).mean(-1, keepdims=True).round().astype(np.float32)[None]
  spec, key = "rand-m9-mstd0.5-inc1", jax.random.key(3)
  levels = np.asarray(A.rand_augment(key, grey, A.parse_rand_augment(spec, "geometric", (124,))))
  bands = np.asarray(A.rand_augment(key, grey * 40, A.parse_rand_augment(
      spec, "geometric", A.fill_colour((124 * 40,), uint8=False), uint8=False)))
  assert not np.array_equal(levels, grey) and bands.max() > 255
  assert (bands != np.round(bands)).any()
  np.testing.assert_allclose(np.floor(np.clip(bands / 40, 0, 255)), levels, atol=1)
  assert (np.abs(np.floor(np.clip(bands / 40, 0, 255)) - levels) > 0).mean() < 0.01
  # The whole fine-tuning augmentation: float bands are normalized as they are (no / 255), and
  # the colour ops refused on them.
  ft.input.mean, ft.input.std = (5000.0, 4000.0, 3000.0), (2000.0, 2500.0, 1500.0)
  ft.augment.update(rand_augment="", reprob=0.0, mixup=0.0, cutmix=0.0)
  pixels = np.repeat(np.concatenate([grey, grey]) * 40, 3, axis=-1)  # 3 float bands
  images, _ = A.finetune_augment(key, pixels, np.zeros(2, np.int32), 5,
                                 A.FinetuneAugment.from_config(ft.augment, ft.input))
  np.testing.assert_allclose(images, (pixels - ft.input.mean) / np.asarray(ft.input.std),
                             rtol=1e-6)
  ft.augment.rand_augment = spec
  with pytest.raises(ValueError, match="decodes to float32 values"):
    A.finetune_augment(key, pixels, np.zeros(2, np.int32), 5,
                       A.FinetuneAugment.from_config(ft.augment, ft.input))


def test_fine_tuning_on_float_bands_refuses_colour_ops_before_the_workdir_is_written(tmp_path):
  from mae_jax import config_checks, finetune  # pylint: disable=g-import-not-at-top,g-multiple-import
  for split in ("train", "val"):
    for label in ("a", "b"):
      (tmp_path / "data" / split / label).mkdir(parents=True)
      for i in range(2):
        np.save(tmp_path / "data" / split / label / f"{i}.npy",
                _bands(24, 20, i, np.float32)[..., :3])
  config = config_lib.finetune_config("vit_b")
  config.model = config_lib.classifier_model_config(
      "vit_b", num_classes=2, img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)
  config.init_from = ""
  config.input = _input(tmp_path / "data", mean=(5000.0,) * 3, std=(2000.0,) * 3)
  config.eval_batch_size, config.total_steps, config.warmup_steps = 4, 2, 1
  workdir = tmp_path / "run"
  with pytest.raises(config_checks.ConfigError) as e:  # the default rand-m9-mstd0.5-inc1
    finetune.train_and_evaluate(config, str(workdir))
  assert len(e.value.problems) == 1, e.value.problems
  assert (f"input.dataset='folder:{tmp_path / 'data'}' decodes to float32 values, not 8-bit "
          f"levels: set --config.augment.rand_augment_ops=geometric") in str(e.value)
  assert not workdir.exists()
  config.augment.rand_augment_ops = "geometric"
  config_checks.validate_config(config, device_count=1, process_count=1)
  assert config_checks.data_problems(config, num_examples=8, num_classes=2, eval_classes=2,
                                     sources=[ip.open_source(config.input)]) == []


def test_fine_tuning_configs_refuse_colour_ops_and_three_channel_stats_for_grey():
  from mae_jax import finetune  # pylint: disable=g-import-not-at-top
  ft = config_lib.finetune_config("vit_b")
  ft.model.in_chans = 1
  with pytest.raises(ValueError, match="rand_augment_ops=geometric"):
    finetune.validate_config(ft, device_count=128)
  ft.augment.rand_augment_ops = "geometric"
  ft.input.mean, ft.input.std = (0.5,), (0.25,)
  finetune.validate_config(ft, device_count=128)


def test_non_square_models_convert_and_export_with_their_grid_tables():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mae_jax import convert, export, models  # pylint: disable=g-import-not-at-top,g-multiple-import
  model = models.MaskedAutoencoder(img_size=(16, 32), patch_size=8, embed_dim=32, depth=1,
                                   num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                                   decoder_num_heads=2)
  shapes = jax.eval_shape(model.init, {"params": jax.random.key(0), "mask": jax.random.key(1)},
                          jnp.zeros((1, 16, 32, 3)))["params"]
  params = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), shapes)
  sd = convert.params_to_torch(params, img_size=(16, 32))
  np.testing.assert_array_equal(sd["pos_embed"][0], models.sincos_pos_embed_2d(32, (2, 4)))
  np.testing.assert_array_equal(sd["decoder_pos_embed"][0],
                                models.sincos_pos_embed_2d(16, (2, 4)))
  config = config_lib.pretrain_config("vit_b")
  config.model.img_size, config.model.patch_size = (16, 32), 8
  tree = export.to_big_vision(params, num_heads=2, grid=export._grid(config))
  np.testing.assert_array_equal(tree["pos_embedding"][0],
                                models.sincos_pos_embed_2d(32, (2, 4), cls_token=False))
