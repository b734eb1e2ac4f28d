"""Every shipped config loads and passes its job's checks (what the README's commands run)."""

import importlib.util
import pathlib

import pytest

from mae_jax import finetune
from mae_jax import train

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.py"))


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
