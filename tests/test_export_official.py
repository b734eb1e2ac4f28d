"""`python -m mae_jax.export --format=official`: a workdir as the .pth the official code saves,
checked by loading it into PyTorch models of the official layout (transformers' ViTMAE and the
models_vit.py classifier of torch_tools) and comparing their outputs with mae_jax's."""

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mae_jax import checkpoint, config_lib, convert, export
from mae_jax.models.classifier import VisionTransformer
from torch_tools import ViTClassifier, official_name, official_state_dict, vitmae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


def _random_params(shapes, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)


def _load(path):
  checkpoint_ = torch.load(path, map_location="cpu", weights_only=True)
  return checkpoint_, {k: v.numpy() for k, v in checkpoint_["model"].items()}


@pytest.mark.parametrize("img_size", [32, (16, 32)], ids=["square", "non_square"])
def test_a_pretraining_workdir_exports_with_the_official_keys_and_reads_back(tmp_path,
                                                                             img_size, caplog):
  m = config_lib.model_config("vit_b", **{**SIZES, "img_size": img_size}, decoder_embed_dim=32,
                              decoder_depth=1, decoder_num_heads=2, norm_pix_loss=False)
  config = config_lib.pretrain_config("vit_b")
  config.model = m
  model = __import__("mae_jax").models.from_config(m)
  h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
  shapes = jax.eval_shape(model.init, {"params": jax.random.key(0), "mask": jax.random.key(0)},
                          jnp.zeros((1, h, w, 3)))["params"]
  params = _random_params(shapes, 1)
  workdir, out = str(tmp_path / "pretrain"), str(tmp_path / "out" / "mae.pth")
  checkpoint.save_params(workdir, params, config)
  with caplog.at_level(logging.WARNING):
    written = export.export_official(workdir, out)
  # models_mae.py builds square models only: a non-square one is written with a warning saying so.
  assert ("MaskedAutoencoderViT cannot load this file" in caplog.text) == (h != w)
  saved, sd = _load(out)
  assert set(sd) == set(written)
  if h == w:
    # The keys of the official models_mae.py of this shape (transformers' ViTMAE, renamed):
    # what load_state_dict(strict=True) needs, the fixed tables included.
    reference = official_state_dict(vitmae(32, 8, 64, 2, 4, 32, 1, 2, False))
    assert set(sd) == set(reference)
    for key in ("pos_embed", "decoder_pos_embed"):  # the same fixed sin-cos tables
      np.testing.assert_allclose(sd[key], reference[key], atol=1e-6, err_msg=key)
  assert saved["args"] == {"input_size": 32 if h == w else [16, 32], "norm_pix_loss": False,
                           "num_heads": 4, "decoder_num_heads": 2}
  jax.tree.map(np.testing.assert_array_equal, convert.params_from_torch(sd), params)
  # mae_jax.convert reads it back as an official checkpoint, norm_pix_loss from its args.
  back = tmp_path / "back"
  result = subprocess.run(
      [sys.executable, "-m", "mae_jax.convert", f"--torch_checkpoint={out}",
       f"--workdir={back}"], env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"},
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  again, again_config = checkpoint.load_params(str(back))
  jax.tree.map(np.testing.assert_array_equal, again, params)
  assert again_config.model.norm_pix_loss is False
  assert (again_config.model.num_heads, again_config.model.decoder_num_heads) == (4, 2)
  assert tuple(np.atleast_1d(again_config.model.img_size)) == ((h,) if h == w else (h, w))


@pytest.mark.parametrize("global_pool,probe", [(True, False), (False, False), (False, True)],
                         ids=["finetuned_global_pool", "finetuned_cls_token", "linear_probe"])
def test_a_classifier_exports_to_the_official_layout_with_the_same_logits(tmp_path, global_pool,
                                                                          probe):
  kwargs = dict(num_classes=5, **SIZES, global_pool=global_pool, head_batchnorm=probe,
                dtype="float32")
  model = VisionTransformer(**kwargs)
  images = np.random.default_rng(2).normal(size=(3, 32, 32, 3)).astype(np.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  params = _random_params(variables["params"], 3)
  stats = {}
  if probe:
    rng = np.random.default_rng(4)
    stats = {"head_norm": {"mean": rng.normal(0, 1, 64).astype(np.float32),
                           "var": rng.uniform(0.01, 4, 64).astype(np.float32)}}
  config = (config_lib.linprobe_config if probe else config_lib.finetune_config)("vit_b")
  config.model = config_lib.classifier_model_config("vit_b", **kwargs)
  workdir, out = str(tmp_path / "classifier"), str(tmp_path / "classifier.pth")
  checkpoint.save_params(workdir, params, config, batch_stats=stats or None)
  export.export_official(workdir, out)
  saved, sd = _load(out)
  assert saved["args"] == {"input_size": 32, "num_heads": 4, "nb_classes": 5,
                           "global_pool": global_pool}
  assert ("fc_norm.weight" in sd) == global_pool and ("norm.weight" in sd) != global_pool
  assert ("head.1.weight" in sd) == probe and ("head.0.running_var" in sd) == probe
  # Into models_vit.py's classifier (on transformers' ViT): each of its params from the
  # official key it stands for (a third of attn.qkv for the q, k and v projections).
  ref = ViTClassifier(32, 8, 64, 2, 4, 5, global_pool=global_pool, head_batchnorm=probe).eval()
  state, used = {}, set()
  for name in ref.state_dict():
    key = official_name(name)
    if key in sd:
      value, qkv = np.asarray(sd[key]), convert._HF_QKV.match(name)  # pylint: disable=protected-access
      if qkv:
        value = np.split(value, 3)["qkv".index((qkv.group(2) or qkv.group(3))[0])]
      state[name] = torch.from_numpy(value.copy())
      used.add(key)
  ref.load_state_dict(state, strict=False)
  # Every exported array found its place; a global-pool model has no final norm
  # (main_finetune.py deletes it), and nothing else of the reference is left out.
  assert used == set(sd)
  assert set(ref.state_dict()) - set(state) == (
      {"vit.layernorm.weight", "vit.layernorm.bias"} if global_pool else set())
  expected = model.apply({"params": params, **({"batch_stats": stats} if probe else {})},
                         images)
  with torch.no_grad():
    logits = ref(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_the_command_writes_the_official_file_and_refuses_a_directory(tmp_path):
  m = config_lib.model_config("vit_b", **SIZES, decoder_embed_dim=32, decoder_depth=1,
                              decoder_num_heads=2)
  config = config_lib.pretrain_config("vit_b")
  config.model = m
  model = __import__("mae_jax").models.from_config(m)
  shapes = jax.eval_shape(model.init, {"params": jax.random.key(0), "mask": jax.random.key(0)},
                          jnp.zeros((1, 32, 32, 3)))["params"]
  workdir = str(tmp_path / "w")
  checkpoint.save_params(workdir, _random_params(shapes, 5), config)
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  run = lambda out: subprocess.run(
      [sys.executable, "-m", "mae_jax.export", f"--workdir={workdir}", "--format=official",
       f"--output={out}"], env=env, capture_output=True, text=True, timeout=600, check=False)
  result = run(tmp_path / "mae.pth")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "wrote" in result.stdout and (tmp_path / "mae.pth").stat().st_size > 0
  refused = run(tmp_path)
  assert refused.returncode == 2
  assert "the official format writes one file" in refused.stderr
  assert "model.pth" in refused.stderr


def test_params_without_their_config_are_refused_naming_what_is_missing_and_the_fix(tmp_path):
  kwargs = dict(num_classes=5, **SIZES, global_pool=True, dtype="float32")
  model = VisionTransformer(**kwargs)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  config = config_lib.finetune_config("vit_b")
  config.model = config_lib.classifier_model_config("vit_b", **kwargs)
  workdir, out = tmp_path / "w", tmp_path / "out.pth"
  checkpoint.save_params(str(workdir), _random_params(shapes, 6), config)
  npz = str(tmp_path / "encoder.npz")
  export.export_workdir(str(workdir), npz)
  (workdir / "config.json").unlink()
  with pytest.raises(ValueError, match="head counts") as error:
    export.export_official(str(workdir), str(out))
  assert "copy the config.json of the run that wrote these params beside its params/" in str(
      error.value)
  with pytest.raises(ValueError, match="--num_heads alone is not enough"):
    export.export_official(str(workdir), str(out), num_heads=4)
  with pytest.raises(ValueError, match="Export the workdir it came from"):
    export.export_official(npz, str(out))
  # A directory as --output: name a file; another format is no answer to --format=official.
  with pytest.raises(ValueError, match="name a file") as error:
    export.export_official(str(workdir), str(tmp_path))
  assert "--format=transformers" not in str(error.value)
  assert not out.exists()
