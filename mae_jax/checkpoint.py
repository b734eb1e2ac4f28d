"""Orbax checkpoints: training state under WORKDIR/checkpoints/<step>/, params under
WORKDIR/params.

A training checkpoint holds the items `params`, `opt_state`, `meta` (step and the noise key:
the input position is the step, since the input pipeline is a function of it) and `config`
(JSON). Arrays are restored onto whatever mesh the abstract target carries, so a checkpoint
written on 8 devices restores on 1 and the other way round.
"""

import json
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

CHECKPOINTS = "checkpoints"
PARAMS = "params"
CONFIG_JSON = "config.json"

Params = Dict[str, Any]


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """WORKDIR/config.json, the config a workdir's params belong to (call on one process)."""
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / CONFIG_JSON).write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def _config_reader(path: epath.Path) -> Optional[Callable[[], ml_collections.ConfigDict]]:
  if not path.exists():
    return None
  return lambda: ml_collections.ConfigDict(json.loads(path.read_text()))


def manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
  """Asynchronous checkpoints in WORKDIR/checkpoints/<step>, keeping the newest `keep`."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                         create=True)
  return ocp.CheckpointManager(epath.Path(workdir) / CHECKPOINTS, options=options)


def save(mngr: ocp.CheckpointManager, state, config: ml_collections.ConfigDict, *,
         force: bool = False) -> None:
  """Starts saving `state` (a train.TrainState) at its step; returns once arrays are copied."""
  step = int(state.step)
  if step in mngr.all_steps():
    return
  mngr.save(step, force=force, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      opt_state=ocp.args.StandardSave(state.opt_state),
      meta=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
      config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))))


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
  """The newest checkpoint restored into `abstract_state`'s shapes and shardings, or None."""
  step = mngr.latest_step()
  if step is None:
    return None
  restored = mngr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_state.params),
      opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
      meta=ocp.args.StandardRestore({"step": abstract_state.step, "rng": abstract_state.rng})))
  logging.info("Resumed from %s/%d.", mngr.directory, step)
  return abstract_state.replace(params=restored["params"], opt_state=restored["opt_state"],
                                step=restored["meta"]["step"], rng=restored["meta"]["rng"])


def save_params(workdir: str, params: Params, config: ml_collections.ConfigDict) -> None:
  """Writes WORKDIR/params (Orbax) and WORKDIR/config.json, replacing earlier ones."""
  path = epath.Path(workdir)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path.absolute() / PARAMS, params, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    write_config(workdir, config)


def has_params(workdir: str) -> bool:
  """Whether WORKDIR/params exists (e.g. written by mae_jax.convert)."""
  return (epath.Path(workdir) / PARAMS).exists()


def _on_one_device(metadata_tree) -> Any:
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                      metadata_tree)


def _shape_problems(found: Any, expected: Any) -> list:
  """Where two trees of shaped leaves differ in structure or shape."""
  found_paths = dict(jax.tree_util.tree_flatten_with_path(found)[0])
  expected_paths = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  name = jax.tree_util.keystr
  problems = [f"{name(p)} is missing" for p in expected_paths if p not in found_paths]
  problems += [f"{name(p)} is not in the model" for p in found_paths if p not in expected_paths]
  problems += [f"{name(p)} has shape {tuple(found_paths[p].shape)}, the model expects "
               f"{tuple(e.shape)}" for p, e in expected_paths.items()
               if p in found_paths and tuple(found_paths[p].shape) != tuple(e.shape)]
  return problems


def find_params(path: str) -> Tuple[epath.Path, Optional[Callable[[], Any]]]:
  """The params directory for `path` and a reader of its config (None if there is none).

  `path` is a workdir (its newest training checkpoint, else its params/), one step directory
  WORKDIR/checkpoints/<step>, or a params directory itself.
  """
  path = epath.Path(path).absolute()
  checkpoints = path / CHECKPOINTS
  if checkpoints.is_dir():
    steps = ocp.utils.checkpoint_steps(checkpoints)
    if steps:
      path = checkpoints / str(max(steps))
  if (path / PARAMS).is_dir():
    if (path / "config").is_dir():  # a training checkpoint's own config item
      return path / PARAMS, lambda: ml_collections.ConfigDict(
          ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path / "config"))
    return path / PARAMS, _config_reader(path / CONFIG_JSON)
  if (path / "_METADATA").exists():
    return path, _config_reader(path.parent / CONFIG_JSON)
  raise FileNotFoundError(
      f"No params under {path}: expected a workdir with {CHECKPOINTS}/<step>/ or {PARAMS}/ "
      f"(written by mae_jax.main or mae_jax.convert), or a params directory.")


def load_params(path: str, *, target: Any = None
                ) -> Tuple[Params, Optional[ml_collections.ConfigDict]]:
  """(params, config or None) from a workdir's newest training checkpoint or its params/.

  `target`: ShapeDtypeStructs (with shardings) to restore into; checked against the stored
  shapes. Without it the params land on one local device.
  """
  params_dir, read_config = find_params(path)
  checkpointer = ocp.StandardCheckpointer()
  stored = checkpointer.metadata(params_dir).item_metadata.tree
  if target is None:
    target = _on_one_device(stored)
  else:
    problems = _shape_problems(stored, target)
    if problems:
      raise ValueError(f"The params in {params_dir} do not fit the config's model (check "
                       f"config.model): " + "; ".join(problems[:8]))
  params = checkpointer.restore(params_dir, target)
  return params, read_config() if read_config else None
