"""Every shipped config loads and passes its job's checks (what the README's commands run)."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

from mae_jax import config_lib
from mae_jax import finetune
from mae_jax import models
from mae_jax import train

REPO = pathlib.Path(__file__).parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.py"))


def _load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_every_config_is_found():
  names = {p.stem for p in CONFIGS}
  assert {"demo", "demo_digits", "vit_b", "vit_l", "vit_h", "finetune_demo",
          "linprobe_demo"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_passes_its_checks(path):
  config = _load(path)
  checks = {"pretrain": train.validate_config, "finetune": finetune.validate_config,
            "linprobe": finetune.validate_config}
  assert config.mode in checks
  if "demo" in path.stem:  # runs on one CPU, on data that ships with the package
    assert config.input.dataset in ("skimage_photos", "sklearn_digits")
    checks[config.mode](config, device_count=1)
  else:  # the paper's runs: on a pod, where their global batches divide
    checks[config.mode](config, device_count=128)


@pytest.mark.parametrize("value,parsed", [("224", 224), ("(48, 64)", (48, 64)),
                                          ("48,64", (48, 64))])
def test_img_size_on_the_command_line_is_an_int_or_a_pair(value, parsed, tmp_path):
  # Through mae_jax.main's own flag parsing; patch_size 5 divides neither size, so the run
  # stops in the config checks (nothing compiles), naming the value as it was parsed.
  result = subprocess.run(
      [sys.executable, "-m", "mae_jax.main", f"--config={REPO}/configs/demo.py",
       f"--workdir={tmp_path}/run", f"--config.model.img_size={value}",
       "--config.model.patch_size=5"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert (f"config.model.patch_size=5 does not divide config.model.img_size={parsed}"
          in result.stderr), result.stderr[-2000:]


def test_img_size_field_takes_both_forms_in_python():
  config = config_lib.pretrain_config("vit_b")
  config.lock()
  assert config.model.img_size == 224
  config.model.img_size = (192, 256)  # a locked config still takes a pair here
  assert models.from_config(config.model).img_size == (192, 256)
  config.model.img_size = [192, 256]  # as config.json gives it back
  assert models.from_config(config.model).img_size == (192, 256)
  ft = config_lib.finetune_config("vit_b")
  ft.model.img_size = (192, 256)
  assert finetune.create_model(ft).img_size == (192, 256)
  config.model.img_size = "big"
  with pytest.raises(ValueError, match=r"config.model.img_size='big': img_size must be an int"):
    train.validate_config(config, device_count=128)
  ft.model.img_size = (100, 224)
  with pytest.raises(ValueError, match=r"patch_size=16 does not divide config.model.img_size="
                     r"\(100, 224\)"):
    finetune.validate_config(ft, device_count=128)
