"""mae_jax.convert: a checkpoint's own facts win over a config's guess; linear probes convert."""

import argparse
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mae_jax import checkpoint, config_lib, convert
from mae_jax.models import from_config
from mae_jax.models.classifier import VisionTransformer, classifier_from_config

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
            decoder_depth=1, decoder_num_heads=2, dtype="float32")


def _random(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)


def _pretrain_config(**overrides):
  config = config_lib.pretrain_config("vit_b")
  config.model = config_lib.model_config("vit_b", **{**TINY, **overrides})
  return config


def _official_mae(**overrides):
  """An official-keyed state dict (with its fixed position tables) of a tiny MAE."""
  model = from_config(_pretrain_config(**overrides).model)
  size = model.img_size
  params = _random(jax.eval_shape(model.init, {"params": jax.random.key(0),
                                               "mask": jax.random.key(0)},
                                  jnp.zeros((1, size, size, 3)))["params"])
  return convert.params_to_torch(params, img_size=size), params


def test_config_fields_that_disagree_with_the_file_are_refused_naming_both(tmp_path):
  sd, _ = _official_mae()
  cases = {
      "img_size": (64, r"config.model.img_size=64, but the checkpoint's is 32 \(pos_embed "
                       r"\[1, 17, 32\]: a 4x4 patch grid\)"),
      "patch_size": (4, r"config.model.patch_size=4, but the checkpoint's is 8 \("
                        r"patch_embed.proj.weight \[32, 3, 8, 8\]\)"),
      # A deeper config once converted silently, leaving the missing blocks to a fresh init.
      "depth": (3, r"config.model.depth=3, but the checkpoint's is 2"),
      "decoder_embed_dim": (32, r"config.model.decoder_embed_dim=32, but the checkpoint's is 16"),
  }
  for field, (value, message) in cases.items():
    with pytest.raises(ValueError, match=message):
      convert.checked_conversion(sd, _pretrain_config(**{field: value}))
  # Another image size has a way, which the message gives (the official code interpolates).
  with pytest.raises(ValueError, match=r"to fine-tune or evaluate at another size, convert at "
                                       r"the file's and set the new img_size"):
    convert.checked_conversion(sd, _pretrain_config(img_size=64))
  # Several at once are all named; nothing was written.
  with pytest.raises(ValueError, match=r"depth=3.*img_size=64"):
    convert.convert_state_dict(sd, str(tmp_path / "w"), _pretrain_config(img_size=64, depth=3))
  assert not (tmp_path / "w").exists()


def test_fields_the_config_leaves_open_come_from_the_file():
  sd, params = _official_mae(img_size=48)  # a 6x6 grid
  config = _pretrain_config(img_size=None, embed_dim=None, decoder_depth=None)
  got, _, config = convert.checked_conversion(sd, config)
  assert (config.model.img_size, config.model.embed_dim, config.model.decoder_depth) == (48, 32, 1)
  jax.tree.map(np.testing.assert_array_equal, got, params)


def test_an_encoder_only_file_leaves_the_decoder_open_but_not_half_a_decoder():
  sd, _ = _official_mae()
  encoder = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
  params, _, _ = convert.checked_conversion(encoder, _pretrain_config(decoder_embed_dim=64))
  assert not set(convert.DECODER_PARAMS) & set(params)
  del sd["decoder_pred.weight"], sd["decoder_pred.bias"]
  with pytest.raises(ValueError, match="decoder_pred/kernel is missing"):
    convert.checked_conversion(sd, _pretrain_config())


def test_a_position_table_that_is_not_the_fixed_one_is_refused():
  sd, _ = _official_mae()
  sd["pos_embed"] = sd["pos_embed"] + 0.5  # a learned table: MaskedAutoencoder would drop it
  with pytest.raises(ValueError, match=r"pos_embed \[1, 17, 32\] is not MAE's fixed 2D sin-cos "
                                       r"table of a 4x4 grid"):
    convert.checked_conversion(sd, _pretrain_config())


def test_without_a_config_the_heads_must_be_known():
  sd, _ = _official_mae()
  with pytest.raises(ValueError, match="does not record its attention heads"):
    convert.checked_conversion(sd)


def test_classifier_and_pretraining_kinds_are_not_mixed():
  sd, _ = _official_mae()
  with pytest.raises(ValueError, match="is a pretrained MAE"):
    convert.checked_conversion(sd, _linprobe_config())
  probe_sd, _, _ = _probe_state_dict()
  with pytest.raises(ValueError, match="is a classifier"):
    convert.checked_conversion(probe_sd, _pretrain_config())


def _linprobe_config():
  config = config_lib.linprobe_config("vit_b")
  config.model = config_lib.classifier_model_config(
      "vit_b", num_classes=5, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
      global_pool=False, head_batchnorm=True, dtype="float32")
  return config


def _probe_state_dict():
  """An official linear-probe state dict (head.0 BatchNorm, head.1 Linear) and its variables."""
  model = classifier_from_config(_linprobe_config().model)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  params = _random(shapes["params"], 1)
  stats = {"head_norm": {"mean": np.linspace(-1, 1, 32).astype(np.float32),
                         "var": np.linspace(0.5, 2, 32).astype(np.float32)}}
  return convert.params_to_torch(params, batch_stats=stats), params, stats


def test_official_linear_probe_checkpoints_convert_with_their_batchnorm_statistics(tmp_path):
  sd, params, stats = _probe_state_dict()
  assert {"head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked",
          "head.1.weight", "head.1.bias"} <= set(sd) and "head.weight" not in sd
  np.savez(tmp_path / "probe.npz", **sd)
  convert.convert(str(tmp_path / "probe.npz"), str(tmp_path / "w"), _linprobe_config())
  got, got_stats, config = checkpoint.load_variables(str(tmp_path / "w"))
  jax.tree.map(np.testing.assert_array_equal, got, params)
  jax.tree.map(np.testing.assert_array_equal, got_stats, stats)
  assert config.mode == "linprobe"
  model = VisionTransformer(**{k: v for k, v in config.model.items()})
  images = np.random.default_rng(2).normal(size=(3, 32, 32, 3)).astype(np.float32)
  logits = model.apply({"params": got, "batch_stats": got_stats}, images)
  feats = model.apply({"params": params}, images, method=VisionTransformer.features)
  normed = (feats - stats["head_norm"]["mean"]) / np.sqrt(stats["head_norm"]["var"] + 1e-6)
  np.testing.assert_allclose(logits, normed @ params["head"]["kernel"] + params["head"]["bias"],
                             rtol=1e-5, atol=1e-5)
  # Back to official keys: the same state dict.
  back = convert.params_to_torch(got, batch_stats=got_stats)
  assert set(back) == set(sd)
  for key in sd:
    np.testing.assert_array_equal(back[key], sd[key])


def _classifier_state_dict(global_pool=True):
  config = config_lib.finetune_config("vit_b")
  config.model = config_lib.classifier_model_config(
      "vit_b", num_classes=5, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
      global_pool=global_pool, dtype="float32")
  model = classifier_from_config(config.model)
  params = _random(jax.eval_shape(model.init, jax.random.key(0),
                                  jnp.zeros((1, 32, 32, 3)))["params"], 2)
  return convert.params_to_torch(params), params, config


def test_files_that_are_not_checkpoints_are_refused_naming_the_file_and_the_fix(tmp_path):
  """A truncated download, another kind of file or another layout: a ValueError that names the
  file and what to do (once an UnpicklingError, EOFError, AttributeError or zip error)."""
  sd, _ = _official_mae()
  good = tmp_path / "good.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 3}, good)
  data = good.read_bytes()
  np.savez(tmp_path / "good.npz", **sd)
  files = {
      "cut.pth": data[:len(data) // 2],
      "cut.npz": (tmp_path / "good.npz").read_bytes()[:1000],
      "empty.pth": b"",
      "text.pth": b"hello world\n",
      "text.safetensors": b"hello world\n",
  }
  for name, content in files.items():
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name} \(\d[\d,]* bytes\) does not read as a .*"
                                         r"compare its size with the original's"):
      convert.convert(str(tmp_path / name), str(tmp_path / "w"), _pretrain_config())
  torch.save([1, 2, 3], tmp_path / "list.pth")
  with pytest.raises(ValueError, match=r"list.pth holds a list, not a state dict"):
    convert.convert(str(tmp_path / "list.pth"), str(tmp_path / "w"), _pretrain_config())
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 1},
             tmp_path / "other_layout.pth")
  with pytest.raises(ValueError, match=r"has no 'model' entry.*\['epoch', 'state_dict'\].*"
                                       r"torch.save\(\{'model': ckpt\['state_dict'\]\}"):
    convert.convert(str(tmp_path / "other_layout.pth"), str(tmp_path / "w"), _pretrain_config())
  with pytest.raises(FileNotFoundError, match="missing.pth: no such checkpoint file"):
    convert.convert(str(tmp_path / "missing.pth"), str(tmp_path / "w"), _pretrain_config())
  assert not (tmp_path / "w").exists()


def test_other_architectures_and_missing_keys_are_named_not_a_key_error():
  """Every entry point (facts, params, the checked conversion) names the keys that are missing
  or have no counterpart, before any grid or shape is read from them."""
  sd, _ = _official_mae()
  classifier, _, ft_config = _classifier_state_dict()
  resnet = {"conv1.weight": np.zeros((8, 3, 7, 7), np.float32),
            "bn1.running_mean": np.zeros(8, np.float32), "fc.weight": np.zeros((5, 8))}
  deit = dict(classifier, dist_token=np.zeros((1, 1, 32), np.float32),
              **{"head_dist.weight": np.zeros((5, 32), np.float32),
                 "head_dist.bias": np.zeros(5, np.float32)})
  deit["pos_embed"] = np.zeros((1, 18, 32), np.float32)  # a row for the distillation token
  no_qkv_bias = {k: v for k, v in sd.items() if not k.endswith("attn.qkv.bias")}
  cases = [
      (resnet, _pretrain_config(), r"no 'patch_embed.proj.weight' \(its keys start with "
                                   r"\['bn1.running_mean', 'conv1.weight', 'fc.weight'\]"),
      (deit, ft_config, r"no counterpart in MAE's ViT \['dist_token', 'head_dist.bias', "
                        r"'head_dist.weight'\] \(another architecture"),
      ({k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}, _pretrain_config(),
       r"missing \['blocks.1.mlp.fc2.bias'\] \(a damaged or partial state dict"),
      ({k: v for k, v in sd.items() if k != "blocks.0.attn.qkv.weight"}, _pretrain_config(),
       r"missing \['blocks.0.attn.qkv.weight'\]"),
      (no_qkv_bias, _pretrain_config(), r"missing \['blocks.0.attn.qkv.bias', "
                                        r"'blocks.1.attn.qkv.bias', 'decoder_blocks.0"),
      ({k: v for k, v in sd.items() if k != "norm.bias"}, _pretrain_config(),
       r"missing \['norm.bias'\]"),
  ]
  for state_dict, config, message in cases:
    for call in (lambda: convert.checked_conversion(state_dict, config),
                 lambda: convert.params_from_torch(state_dict),
                 lambda: convert.checkpoint_facts(state_dict)):
      with pytest.raises(ValueError, match=message):
        call()


def test_the_official_checkpoint_layouts_convert_as_the_bare_state_dict(tmp_path):
  """{'model': sd, 'optimizer', 'epoch', 'args', ...} as main_pretrain.py saves it, keys from
  a DistributedDataParallel or torch.compile wrapper, the whole checkpoint given to
  params_from_torch: the same params as the bare state dict."""
  sd, params = _official_mae()
  tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
  layouts = {
      "official": {"model": tensors, "optimizer": {"state": {}}, "epoch": 3, "scaler": {}},
      "ddp": {"model": {f"module.{k}": v for k, v in tensors.items()}, "epoch": 3},
      "compiled": {"model": {f"_orig_mod.{k}": v for k, v in tensors.items()}},
      "bare": tensors,
  }
  for name, ckpt in layouts.items():
    torch.save(ckpt, tmp_path / f"{name}.pth")
    got, _, _ = convert.convert(str(tmp_path / f"{name}.pth"), str(tmp_path / name),
                                _pretrain_config())
    jax.tree.map(np.testing.assert_array_equal, got, params)
  jax.tree.map(np.testing.assert_array_equal, convert.params_from_torch(layouts["official"]),
               params)


def test_a_file_saved_in_half_precision_keeps_its_fixed_position_tables():
  """float16 / bfloat16 files hold the sin-cos tables rounded: still MAE's fixed tables (once
  refused as 'a learned table would be lost'); a table that is another is still refused."""
  sd, _ = _official_mae()
  for dtype in (np.float16, jnp.bfloat16):
    half = {k: np.asarray(v).astype(dtype) for k, v in sd.items()}
    params, _, _ = convert.checked_conversion(half, _pretrain_config())
    np.testing.assert_allclose(params["cls"], sd["cls_token"], atol=2e-2)
    half["decoder_pos_embed"] = (sd["decoder_pos_embed"] * 0.9).astype(dtype)
    with pytest.raises(ValueError, match="decoder_pos_embed .* is not MAE's fixed"):
      convert.checked_conversion(half, _pretrain_config())


def test_convert_refuses_a_training_workdir_and_replaces_an_earlier_conversion(tmp_path):
  """Converting into a training run's workdir once replaced its config.json silently; into an
  earlier conversion it replaces that one whole, leaving no linear probe's statistics behind."""
  sd, _ = _official_mae()
  run = tmp_path / "run"
  (run / "checkpoints" / "10").mkdir(parents=True)
  (run / "config.json").write_text('{"mode": "pretrain"}')
  with pytest.raises(ValueError, match=r"holds a training run \(checkpoints\).*new --workdir"):
    convert.convert_state_dict(sd, str(run), _pretrain_config())
  assert (run / "config.json").read_text() == '{"mode": "pretrain"}'
  assert not (run / "params").exists()
  # A workdir that cannot be written is refused before the file is read (once: after the
  # conversion, by Orbax).
  (tmp_path / "a_file").write_text("")
  for workdir, message in ((tmp_path / "a_file", r"--workdir=.*a_file is a file"),
                           (tmp_path / "a_file" / "w", r"a_file/w cannot be a directory")):
    with pytest.raises(ValueError, match=message):
      convert.convert(str(tmp_path / "missing.pth"), str(workdir), _pretrain_config())
  probe_sd, _, _ = _probe_state_dict()
  out = tmp_path / "w"
  convert.convert_state_dict(probe_sd, str(out), _linprobe_config())
  assert (out / "batch_stats").is_dir()
  classifier, params, ft_config = _classifier_state_dict(global_pool=False)
  convert.convert_state_dict(classifier, str(out), ft_config)
  got, stats, config = checkpoint.load_variables(str(out))
  assert not (out / "batch_stats").exists() and not stats and config.mode == "finetune"
  jax.tree.map(np.testing.assert_array_equal, got, params)


def test_the_decoders_target_recorded_in_the_official_args_wins_and_is_otherwise_announced(
    tmp_path, caplog):
  """main_pretrain.py saves its flags (`args`) with every checkpoint; their norm_pix_loss says
  what the decoder predicts, and it once gave way silently to a config's default (True), which
  makes mae_jax.visualize map pixel predictions as normalized patches. A full file that does not
  record it (the released ones) converts with a warning naming the official visualization
  checkpoints, which predict pixels."""
  sd, _ = _official_mae()
  args = argparse.Namespace(model="mae_vit_base_patch16", input_size=32, mask_ratio=0.75,
                            norm_pix_loss=False, batch_size=64)
  tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
  torch.save({"model": tensors, "optimizer": {}, "epoch": 3, "scaler": {}, "args": args},
             tmp_path / "trained.pth")
  assert convert.read_checkpoint(str(tmp_path / "trained.pth"))[2] == {"norm_pix_loss": False}
  with pytest.raises(ValueError, match=r"config.model.norm_pix_loss=True, but the checkpoint's "
                                       r"is False \(args.norm_pix_loss, saved by main_pretrain"):
    convert.convert(str(tmp_path / "trained.pth"), str(tmp_path / "a"), _pretrain_config())
  _, _, config = convert.convert(str(tmp_path / "trained.pth"), str(tmp_path / "b"),
                                 _pretrain_config(norm_pix_loss=False))
  assert checkpoint.load_params(str(tmp_path / "b"))[1].model.norm_pix_loss is False
  # Without --config the recorded value is the config's (the paper's ViT-B sizes, as facts).
  facts = {"embed_dim": convert.Fact(768, "x"), "depth": convert.Fact(12, "x"),
           "decoder_embed_dim": convert.Fact(512, "x"), "decoder_depth": convert.Fact(8, "x"),
           "norm_pix_loss": convert.Fact(False, "args.norm_pix_loss")}
  assert convert.default_config(facts).model.norm_pix_loss is False
  torch.save({"model": tensors}, tmp_path / "released.pth")
  with caplog.at_level(logging.WARNING):
    convert.convert(str(tmp_path / "released.pth"), str(tmp_path / "c"), _pretrain_config())
  assert ("does not record what its decoder learned to predict: taking "
          "config.model.norm_pix_loss=True" in caplog.text)
  assert "mae_visualize_vit_*.pth ones predict pixels" in caplog.text
  caplog.clear()
  encoder = {k: v for k, v in tensors.items() if not k.startswith(("decoder", "mask_token"))}
  torch.save({"model": encoder}, tmp_path / "encoder.pth")
  with caplog.at_level(logging.WARNING):
    convert.convert(str(tmp_path / "encoder.pth"), str(tmp_path / "d"), _pretrain_config())
  assert "decoder learned" not in caplog.text


def test_a_whole_model_saved_with_torch_save_is_read_only_when_trusted(tmp_path, monkeypatch):
  """torch.save(model) pickles the model's class by reference, and unpickling it can run any
  code: by default the file is refused, naming the class and the two ways on (it was once read
  with weights_only=False, so a downloaded .pth ran what it held). Trusted, where that class
  imports, its state_dict() converts; elsewhere the error says how to save a state dict (it once
  read as 'a file cut short')."""
  (tmp_path / "user_models.py").write_text(
      "import torch\n"
      "class Encoder(torch.nn.Module):\n"
      "  def __init__(self, sd):\n"
      "    super().__init__()\n"
      "    for k, v in sd.items():\n"
      "      self.register_buffer(k.replace('.', '__'), v)\n"
      "  def state_dict(self, *args, **kwargs):\n"
      "    return {k.replace('__', '.'): v for k, v in super().state_dict().items()}\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  import user_models  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  sd, params = _official_mae()
  torch.save(user_models.Encoder({k: torch.from_numpy(v) for k, v in sd.items()}),
             tmp_path / "whole.pth")
  with pytest.raises(convert.UnsafePickleError,
                     match=r"whole.pth pickles Python objects beside tensors \(user_models."
                           r"Encoder.*--trust_pickle.*torch.save\(\{'model': model.state_dict"):
    convert.convert(str(tmp_path / "whole.pth"), str(tmp_path / "refused"), _pretrain_config())
  assert not (tmp_path / "refused" / "params").exists()
  got, _, _ = convert.convert(str(tmp_path / "whole.pth"), str(tmp_path / "w"),
                              _pretrain_config(), trust_pickle=True)
  jax.tree.map(np.testing.assert_array_equal, got, params)
  monkeypatch.delitem(sys.modules, "user_models")
  monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
  with pytest.raises(ValueError, match=r"whole.pth pickles an object whose class is not "
                                       r"importable here \(ModuleNotFoundError: No module named "
                                       r"'user_models'\).*torch.save\(\{'model': model."
                                       r"state_dict\(\)\}, PATH\)"):
    convert.load_torch_state_dict(str(tmp_path / "whole.pth"), trust_pickle=True)


def test_an_official_training_checkpoint_reads_without_unpickling_code(tmp_path, monkeypatch):
  """What main_pretrain.py's save_model writes (model, AdamW state, epoch, loss scaler, the
  argparse flags) converts under torch.load(weights_only=True); nothing is unpickled with
  weights_only=False on the way."""
  sd, params = _official_mae()
  model = torch.nn.Linear(4, 4)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95))
  model(torch.ones(2, 4)).sum().backward()
  optimizer.step()
  args = argparse.Namespace(model="mae_vit_base_patch16", norm_pix_loss=True, blr=1.5e-4,
                            output_dir="./output_dir", resume="", device="cuda")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()},
              "optimizer": optimizer.state_dict(), "epoch": 799,
              "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                         "growth_interval": 2000, "_growth_tracker": 17},
              "args": args}, tmp_path / "checkpoint-799.pth")
  loads = []
  real_load = torch.load

  def recording_load(*a, **kw):
    loads.append(kw.get("weights_only"))
    return real_load(*a, **kw)

  monkeypatch.setattr(torch, "load", recording_load)
  got, _, config = convert.convert(str(tmp_path / "checkpoint-799.pth"), str(tmp_path / "w"),
                                   _pretrain_config())
  assert loads == [True]
  assert config.model.norm_pix_loss
  jax.tree.map(np.testing.assert_array_equal, got, params)


def test_a_conversion_cut_short_never_pairs_new_params_with_the_old_config(tmp_path,
                                                                           monkeypatch):
  """Re-converting into a workdir replaced params/ first and config.json last: a crash between
  left the new params with the earlier conversion's config (another mode, heads, target)."""
  probe_sd, _, _ = _probe_state_dict()
  out = tmp_path / "w"
  convert.convert_state_dict(probe_sd, str(out), _linprobe_config())
  assert (out / "config.json").exists() and (out / "batch_stats").is_dir()

  def crash(*args):
    raise KeyboardInterrupt("killed before config.json was written")

  monkeypatch.setattr(checkpoint, "write_config", crash)
  sd, params = _official_mae()
  with pytest.raises(KeyboardInterrupt):
    convert.convert_state_dict(sd, str(out), _pretrain_config())
  assert not (out / "config.json").exists() and not (out / "batch_stats").exists()
  got, config = checkpoint.load_params(str(out))
  assert config is None
  jax.tree.map(np.testing.assert_array_equal, got, params)


def test_model_fields_no_array_fixes_are_checked_before_anything_is_written(tmp_path):
  """A mask ratio, dtype or head count that mae_jax cannot run was written into config.json
  (mask_ratio=1.5 converted silently; dtype='float8' ended in a TypeError traceback)."""
  sd, _ = _official_mae()
  for overrides, message in (
      (dict(mask_ratio=1.5), r"config.model.mask_ratio=1.5 is outside \[0, 1\)"),
      (dict(dtype="float8"), r"config.model.dtype='float8' is not one of"),
      (dict(num_heads=3), r"config.model.num_heads=3 does not divide config.model.embed_dim=32")):
    with pytest.raises(ValueError, match=r"the config's model is not one mae_jax can run: "
                                         + message):
      convert.convert_state_dict(sd, str(tmp_path / "w"), _pretrain_config(**overrides))
  assert not (tmp_path / "w").exists()
