"""One check of the config for every job, and errors a person can read.

A wrong config of any job (pretraining, fine-tuning, linear probing) fails before anything is
compiled or written, listing every wrong field with its fix, including what must agree with the
data; the command line answers a wrong flag, file or field in a few lines with exit status 2.
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from mae_jax import config_checks, config_lib, finetune, train

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = dict(num_classes=10, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
            dtype="float32")


def _classifier_config(mode: str, **overrides):
  """A tiny fine-tuning or probing config on the shipped digits (10 classes)."""
  if mode == "finetune":
    c = config_lib.finetune_config("vit_b")
    c.model = config_lib.classifier_model_config("vit_b", **TINY)
    c.augment.rand_augment = ""
  else:
    c = config_lib.linprobe_config("vit_b")
    c.model = config_lib.classifier_model_config("vit_b", global_pool=False,
                                                 head_batchnorm=True, **TINY)
  c.init_from = ""
  c.input.dataset = "sklearn_digits"
  c.input.batch_size = 8
  c.input.num_workers = 0
  c.eval_batch_size = 120
  c.total_steps = 4
  c.warmup_steps = 1
  c.optimizer.lr = 1e-3
  c.update_from_flattened_dict(overrides)
  return c


@pytest.mark.parametrize("mode", ["finetune", "linprobe"])
def test_one_input_channel_fails_before_anything_is_written(tmp_path, mode):
  # Before: the state was built, config.json, checkpoints/ and tensorboard/ written, and step 1
  # failed on the images' shape, naming no config field.
  workdir = tmp_path / "run"
  with pytest.raises(config_checks.ConfigError) as e:
    finetune.train_and_evaluate(_classifier_config(mode, **{"model.in_chans": 1}), str(workdir))
  # The digits are RGB pictures and ImageNet's 3-channel statistics the default: both named.
  assert ("for config.model.in_chans=1: set --config.input.mean and --config.input.std"
          in str(e.value))
  assert not workdir.exists()


@pytest.mark.parametrize("num_classes", [5, 1])
def test_fewer_classes_than_the_data_has_fails_naming_the_right_count(tmp_path, num_classes):
  # Before: 5 classes trained to exit 0 with eval_loss nan; 1 class to a loss of 0.0.
  workdir = tmp_path / "run"
  with pytest.raises(config_checks.ConfigError) as e:
    finetune.train_and_evaluate(
        _classifier_config("finetune", **{"model.num_classes": num_classes}), str(workdir))
  assert (f"config.model.num_classes={num_classes}, but input.dataset='sklearn_digits' has 10 "
          f"classes; set config.model.num_classes=10.") in str(e.value)
  assert not workdir.exists()


def test_every_wrong_field_of_a_finetuning_config_is_listed_at_once(tmp_path):
  config = _classifier_config("finetune", **{
      "model.in_chans": 1, "model.num_classes": 5, "log_every_steps": 0,
      "checkpoint_every_steps": 0, "warmup_steps": 10, "input.crop_scale": (0.5, 0.2)})
  with pytest.raises(config_checks.ConfigError) as e:
    finetune.train_and_evaluate(config, str(tmp_path / "run"))
  assert len(e.value.problems) == 7, e.value.problems
  # The digits are RGB pictures: the first file read for in_chans=1 is named too.
  for field in ("model.in_chans=1", "model.num_classes=5", "config.log_every_steps=0",
                "config.checkpoint_every_steps=0", "input.crop_scale=(0.5, 0.2)",
                "shorten the warmup", "is a colour image (RGB), but config.model.in_chans=1"):
    assert field in str(e.value), str(e.value)
  assert not (tmp_path / "run").exists()


def test_fields_once_checked_late_or_never_are_refused_before_anything_is_written(tmp_path):
  """A negative seed failed in the input pipeline after the workdir was written; a RandAugment
  string with an unknown section failed while the step was traced; a drop path, label smoothing
  or probability outside its range trained without a word."""
  config = _classifier_config("finetune", **{
      "seed": -1, "augment.rand_augment": "rand-m9-foo", "model.drop_path": 1.5,
      "augment.smoothing": 1.5, "augment.reprob": 2.0, "augment.mixup": -0.8,
      "augment.mixup_switch_prob": -0.1})
  with pytest.raises(config_checks.ConfigError) as e:
    finetune.train_and_evaluate(config, str(tmp_path / "run"))
  for message in ("config.seed=-1 must be an integer in [0, 2**63)",
                  "config.augment.rand_augment 'rand-m9-foo': unknown section 'foo'",
                  "config.model.drop_path=1.5 must lie in [0, 1)",
                  "config.augment.smoothing=1.5 must lie in [0, 1)",
                  "config.augment.reprob=2.0 must lie in [0, 1]",
                  "config.augment.mixup=-0.8 must be >= 0",
                  "config.augment.mixup_switch_prob=-0.1 must lie in [0, 1]"):
    assert message in str(e.value), str(e.value)
  assert len(e.value.problems) == 7, e.value.problems
  assert not (tmp_path / "run").exists()
  ops = _classifier_config("finetune", **{"augment.rand_augment": "rand-m9-mstd0.5-inc1",
                                          "augment.rand_augment_ops": "colour"})
  pretrain = config_lib.pretrain_config("vit_b")
  pretrain.seed = -3
  for config, message in ((ops, "config.augment.rand_augment_ops='colour' is not one of"),
                          (pretrain, "config.seed=-3 must be an integer")):
    with pytest.raises(ValueError, match=message):
      config_checks.validate_config(config, device_count=1, process_count=1)


def test_the_same_validator_serves_every_job():
  assert train.validate_config is finetune.validate_config is config_checks.validate_config
  pretrain = config_lib.pretrain_config("vit_b")
  pretrain.model.in_chans = 1
  probe = _classifier_config("linprobe", **{"model.in_chans": 1, "model.global_pool": True})
  for config, extra in ((pretrain, None), (probe, "linear probing uses the cls token")):
    with pytest.raises(ValueError) as e:
      train.validate_config(config, device_count=8, process_count=1)
    assert "config.model.in_chans=1" in str(e.value)
    assert extra is None or extra in str(e.value)


def test_a_config_of_another_job_is_refused_whatever_config_mode_says():
  # config.mode is no switch: a config file of one job lacks the fields of the others.
  for make, mode, lacking, start in (
      (config_lib.linprobe_config, "finetune", "config.augment", "configs/finetune_"),
      (config_lib.finetune_config, "pretrain", "config.model.decoder_embed_dim", "configs/vit_"),
      (config_lib.pretrain_config, "linprobe", "config.eval_batch_size", "configs/linprobe_")):
    config = make("vit_b")
    config.mode = mode
    problems = config_checks.config_problems(config, device_count=1, process_count=1)
    assert len(problems) == 1 and problems[0].startswith(f"config.mode={mode!r}"), problems
    assert lacking in problems[0] and start in problems[0], problems
  # A config of the right job that lacks a field or two is not taken for another job's.
  config = config_lib.finetune_config("vit_b")
  del config.augment["reprob"]
  problems = config_checks.config_problems(config, device_count=1, process_count=1)
  assert not any("made for" in p for p in problems), problems


def test_main_refuses_a_config_of_another_job_in_a_few_lines(tmp_path):
  result = _main(tmp_path, f"--config={REPO}/configs/linprobe_demo.py", "--workdir=run",
                 "--config.mode=finetune")
  _assert_short_error(result, "config.mode='finetune'", "configs/finetune_")
  assert result.returncode == 2
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("guard,branches", [("cond", True), ("select", False)])
def test_config_nonfinite_guard_chooses_the_finetuning_steps_guard(guard, branches):
  config = _classifier_config("finetune", nonfinite_guard=guard)
  model = finetune.create_model(config)
  lr = train.create_learning_rate_fn(config, steps_per_epoch=10)
  tx = finetune.create_optimizer(config, jax.eval_shape(
      lambda: finetune.init_state(model, finetune.optax.identity(), 0, config.mode)).params,
      lr)
  state = jax.eval_shape(lambda: finetune.init_state(model, tx, 0, config.mode))
  options = finetune.step_options(config)
  assert options["guard_branch"] is branches
  images = jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.uint8)
  labels = jax.ShapeDtypeStruct((8,), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda s, x, y: finetune.train_step(
      s, x, y, model=model, tx=tx, learning_rate=lr, **options))(state, images, labels)
  assert ("cond[" in str(jaxpr)) is branches


def _main(tmp_path, *args, module="mae_jax.main"):
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)


def _assert_short_error(result, *expected):
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert "Traceback" not in result.stderr and len(lines) <= 6, result.stderr
  for text in expected:
    assert text in result.stderr, result.stderr


@pytest.mark.parametrize("args,expected", [
    (["--config.model.mask_ration=0.5"], ["has no field config.model.mask_ration",
                                          "Did you mean --config.model.mask_ratio?"]),
    (["--config.model.patch_size=5", "--config.optimizer.b2=1.0"],
     ["config.model.patch_size=5 does not divide config.model.img_size=64",
      "config.optimizer.b2=1.0 must lie in [0, 1)", "docs/configs.md"]),
], ids=["typo", "two_wrong_values"])
def test_main_answers_a_wrong_field_in_a_few_lines(tmp_path, args, expected):
  result = _main(tmp_path, f"--config={REPO}/configs/demo.py", "--workdir=run", *args)
  _assert_short_error(result, *expected)
  assert result.returncode == 2
  assert not (tmp_path / "run").exists()


def test_every_command_answers_a_wrong_field_or_file_in_a_few_lines(tmp_path):
  """The commands with a --config besides main's once answered a misspelt field with a 30-line
  traceback, and convert a bad checkpoint file, export, visualize, extract and plot a workdir
  that cannot serve with their ValueError's traceback."""
  (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 cut short")
  config = f"--config={REPO}/configs/demo.py"
  cases = [
      ("mae_jax.convert", ["--torch_checkpoint=x.pth", "--workdir=w", config,
                           "--config.model.norm_pix_los=False"],
       ["has no field config.model.norm_pix_los", "Did you mean --config.model.norm_pix_loss?"]),
      ("mae_jax.convert", ["--torch_checkpoint=cut.pth", "--workdir=w", config],
       ["Error: cut.pth (", "does not read as a PyTorch checkpoint", "Nothing was written."]),
      ("mae_jax.visualize", ["--workdir=w", config, "--config.model.mask_rati=0.5"],
       ["Did you mean --config.model.mask_ratio?"]),
      ("mae_jax.stats", [config, "--config.input.datset=x"],
       ["Did you mean --config.input.dataset?"]),
      # A workdir that cannot serve: the other commands' ValueErrors, once tracebacks.
      ("mae_jax.export", ["--workdir=nowhere", "--output=o.npz"],
       ["Error: ", "nowhere does not exist: expected a workdir", "Nothing was written."]),
      ("mae_jax.visualize", ["--workdir=nowhere"], ["Error: ", "nowhere does not exist"]),
      ("mae_jax.extract", ["--workdir=nowhere", "--output=f.npz"],
       ["Error: ", "nowhere does not exist"]),
      ("mae_jax.plot", ["--workdir=."], ["Error: . has no metrics.jsonl rows"]),
      # A required flag left out: absl's own error once exited 1 here.
      ("mae_jax.export", ["--workdir=nowhere"], ["Error: ", "--output"]),
      ("mae_jax.extract", ["--workdir=nowhere", "--nonsense=1"], ["Error: ", "nonsense"]),
      # A path given empty once meant the current directory (main trained into it).
      ("mae_jax.main", [config, "--workdir="], ["Error: --workdir is empty: give a path"]),
      ("mae_jax.visualize", ["--workdir="], ["Error: --workdir is empty"]),
      ("mae_jax.plot", ["--workdir=a", "--workdir="], ["Error: --workdir is empty"]),
      ("mae_jax.export", ["--workdir=w", "--output="], ["Error: --output is empty"]),
  ]
  results = [_main(tmp_path, *args, module=module) for module, args, _ in cases]
  for (_, _, expected), result in zip(cases, results):
    _assert_short_error(result, *expected)
    assert result.returncode == 2
  assert not (tmp_path / "w").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.pth"]  # nothing written in the cwd


def test_a_field_of_another_job_is_named_as_such_not_as_a_typo():
  """--config.init_from on a pretraining config (the official main_pretrain.py user's way to
  start from weights) once got only "has no field"; --config.model.mask_ratio on a fine-tuning
  config was taken for a misspelt mlp_ratio."""
  # pylint: disable=protected-access
  message = config_lib._unknown_field(["--config.init_from=w"], f"{REPO}/configs/demo.py")
  assert ("has no field config.init_from. It is a field of fine-tuning (configs/finetune_*.py) "
          "and linear probing (configs/linprobe_*.py) configs. Pretraining starts from a "
          "converted checkpoint when --workdir is the workdir mae_jax.convert wrote") in message
  message = config_lib._unknown_field(["--config.model.mask_ratio=0.5"],
                                      f"{REPO}/configs/finetune_demo.py")
  assert "It is a field of pretraining (configs/vit_*.py, demo*.py) configs." in message
  assert "mlp_ratio" not in message
  message = config_lib._unknown_field(["--config.total_stepz=5"], f"{REPO}/configs/demo.py")
  assert "Did you mean --config.total_steps?" in message and "It is a field" not in message


def test_a_wrong_input_field_is_named_once(tmp_path):
  # The trainer's checks and the input pipeline's own both cover input.batch_size.
  result = _main(tmp_path, f"--config={REPO}/configs/demo.py", "--workdir=run",
                 "--config.input.batch_size=-1")
  _assert_short_error(result, "config.input.batch_size=-1")
  assert result.stderr.count("batch_size=-1") == 1, result.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config,expected", [
    ("configs/no_such.py", "no such config file"),
    ("configs/vit_b.py:L/16", "configs/vit_b.py has no variants"),
], ids=["missing_file", "variant"])
def test_main_answers_a_wrong_config_file_in_a_few_lines(tmp_path, config, expected):
  result = _main(tmp_path, f"--config={REPO}/{config}", "--workdir=run")
  _assert_short_error(result, expected)
  assert result.returncode == 2
  assert not (tmp_path / "run").exists()


def test_visualize_refuses_a_mask_ratio_of_one_in_a_few_lines(tmp_path):
  result = _main(tmp_path, "--workdir=run", "--mask_ratio=1.0", module="mae_jax.visualize")
  _assert_short_error(result, "--mask_ratio=1.0: must lie in [0, 1)")


def test_a_file_that_does_not_fit_met_during_the_run_ends_in_one_error_line(monkeypatch,
                                                                           capsys, tmp_path):
  # The early config check reads only each split's first file; a later one that does not fit
  # stops the run at its batch (DatasetMismatch), which main reports as an error, not a traceback.
  from mae_jax import main  # pylint: disable=g-import-not-at-top
  from mae_jax.input_pipeline import decode  # pylint: disable=g-import-not-at-top

  def job(config, workdir):
    del config, workdir
    raise decode.DatasetMismatch("data/20.npy has 5 channels, but config.model.in_chans=4: ...")

  monkeypatch.setitem(main._JOBS, "pretrain", job)  # pylint: disable=protected-access
  monkeypatch.setattr(main.distributed, "initialize", lambda: None)
  monkeypatch.setattr(main, "_CONFIG", type("Flag", (), {"value": config_lib.pretrain_config(
      "vit_b")})())
  monkeypatch.setattr(main, "_WORKDIR", type("Flag", (), {"value": str(tmp_path / "run")})())
  with pytest.raises(SystemExit) as exit_info:
    main.main(["mae_jax.main"])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith("Error: data/20.npy has 5 channels") and "Traceback" not in err
  assert "resumes from the newest" in err


def test_help_says_where_the_config_fields_are_documented():
  from mae_jax import main  # pylint: disable=g-import-not-at-top  # defines the flags
  assert "docs/configs.md" in flags.FLAGS["config"].help
  assert "docs/configs.md" in main.__doc__
  assert (REPO / "docs" / "configs.md").is_file()


def _fields(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _fields(value, f"{prefix}{key}.")
    else:
      yield prefix + key


def test_every_field_of_every_job_is_documented():
  doc = (REPO / "docs" / "configs.md").read_text()
  for make in (config_lib.pretrain_config, config_lib.finetune_config,
               config_lib.linprobe_config):
    missing = [f for f in _fields(make("vit_b")) if f"`{f}`" not in doc]
    assert not missing, missing


def test_docs_and_code_cite_no_file_outside_the_repository():
  outside = ("RECIPE" + ".md", "ANCHORS" + ".md")  # split: this file must not match itself
  paths = [*REPO.glob("*.md"), *(p for folder in ("mae_jax", "configs", "docs", "launch", "tests")
                                  for p in (REPO / folder).rglob("*") if p.is_file()
                                  and p.suffix in (".py", ".md", ".sh", ".sbatch"))]
  found = [f"{path.relative_to(REPO)}: {name}" for path in paths
           for name in outside if name in path.read_text(errors="ignore")]
  assert not found, found
  for doc in ("recipe.md", "configs.md"):
    assert (REPO / "docs" / doc).is_file()
