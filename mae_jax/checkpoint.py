"""Orbax checkpoints: training state under WORKDIR/checkpoints/<step>/, params under
WORKDIR/params.

A training checkpoint holds the items `params`, `opt_state`, `meta` (step and the noise key:
the input position is the step, since the input pipeline is a function of it), `config`
(JSON) and any further field of the state (fine-tuning's `batch_stats`). Arrays are restored
onto whatever mesh the abstract target carries, so a checkpoint written on 8 devices restores
on 1 and the other way round.

Faults: a save killed half-way leaves only a temporary folder (Orbax commits a step by renaming
it), which is never restored and is deleted at the next start; a committed checkpoint that does
not read is set aside in WORKDIR/damaged_checkpoints/ and the one before it restored; one of
another model is refused, naming the fields that differ.
"""

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import socket
import threading
import time
import zlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from mae_jax import loss_scale
from mae_jax import writers

CHECKPOINTS = "checkpoints"
DAMAGED = "damaged_checkpoints"
PARAMS = "params"
BATCH_STATS = "batch_stats"
CONFIG_JSON = "config.json"
# Model fields that say how the model computes, not what it is: a run may change them on resume.
EXECUTION_FIELDS = ("dtype", "remat", "attention_impl")

Params = Dict[str, Any]


def absolute(path: str) -> str:
  """A local path made absolute (Orbax refuses relative ones, and the working directory may
  change); a URL such as gs://bucket/dir stays as it is."""
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """WORKDIR/config.json, the config a workdir's params belong to (call on one process)."""
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / CONFIG_JSON).write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def _config_reader(path: epath.Path) -> Optional[Callable[[], ml_collections.ConfigDict]]:
  if not path.exists():
    return None
  return lambda: ml_collections.ConfigDict(json.loads(path.read_text()))


# --- checksums ----------------------------------------------------------------------------------
# Orbax verifies no array bytes: TensorStore's zarr3 layout checks a crc32c of each shard's
# index only, and the default zarr2 layout nothing, so a flipped byte restores silently. Each
# step folder therefore carries CHECKSUMS, the CRC-32 and size of every file in it, written by
# process 0 into the temporary folder after all processes have written and before Orbax commits
# it by renaming (so a committed checkpoint has its checksums, or was written before they
# existed), and verified before anything restores from the folder.
CHECKSUMS = "checksums.json"
# Orbax rewrites its step metadata, and marks a commit in place on object stores, after the
# callback: files the checksums leave out (a damaged one fails to read anyway).
_UNCHECKED = (CHECKSUMS, "_CHECKPOINT_METADATA", "commit_success.txt")
_CHUNK = 16 << 20


def _crc32(path: epath.Path) -> int:
  crc = 0
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def _files(folder: epath.Path) -> List[epath.Path]:
  """Every file below `folder` but _UNCHECKED (a listing per folder: object stores too)."""
  out = []
  for p in folder.iterdir():
    if p.is_dir():
      out += _files(p)
    elif p.name not in _UNCHECKED:
      out.append(p)
  return sorted(out)


def write_checksums(folder: str) -> None:
  """Writes FOLDER/checksums.json: {"crc32": {relative path: [size in bytes, CRC-32]}}."""
  folder = epath.Path(folder)
  table = {str(p.relative_to(folder)): [p.stat().length, _crc32(p)] for p in _files(folder)}
  (folder / CHECKSUMS).write_text(json.dumps({"crc32": table}, indent=0, sort_keys=True))


class ChecksumError(OSError):
  """A checkpoint's bytes differ from those its checksums.json recorded."""


def verify_checksums(folder: str, under: Optional[str] = None) -> bool:
  """Raises ChecksumError naming each file of FOLDER (or of its subfolder `under`) whose size or
  CRC-32 differs from FOLDER/checksums.json, or that is gone; False when the folder has no
  checksums (written before they existed, or by other code), True when all match."""
  folder = epath.Path(folder)
  if not (folder / CHECKSUMS).exists():
    return False
  table = json.loads((folder / CHECKSUMS).read_text())["crc32"]
  bad = []
  for name, (size, crc) in sorted(table.items()):
    if under is not None and not name.startswith(under.rstrip("/") + "/"):
      continue
    path = folder / name
    if not path.exists():
      bad.append(f"{path} is gone")
    elif path.stat().length != size:
      bad.append(f"{path} has {path.stat().length} bytes, {size} when saved")
    elif _crc32(path) != crc:
      bad.append(f"{path} has other bytes than when saved (CRC-32 differs)")
  if bad:
    raise ChecksumError(f"failed its checksums ({folder / CHECKSUMS}): " + "; ".join(bad[:5]))
  return True


def _checksum_pending_save(checkpoints: epath.Path) -> None:
  """Orbax's post-finalization callback (process 0, all processes' writes done, not yet
  renamed): checksums into the folder of the save in flight. Orbax runs one save at a time, so
  that is the only temporary folder; where Orbax writes in place (object stores, no rename), the
  newest step folder without checksums."""
  pending = sorted(checkpoints.glob("*.orbax-checkpoint-tmp*"))
  if not pending:
    steps = [p for p in checkpoints.iterdir() if p.name.isdigit()
             and not (p / CHECKSUMS).exists()]
    pending = sorted(steps, key=lambda p: int(p.name))[-1:]
  for folder in pending:
    write_checksums(folder)


def remove_empty_checkpoints_dir(workdir: str) -> bool:
  """Removes WORKDIR/checkpoints when it holds nothing (a job that saved no step, such as an
  eval_only evaluation, leaves no folder that looks like a run to resume); whether it did."""
  path = epath.Path(absolute(workdir)) / CHECKPOINTS
  if path.is_dir() and not any(path.iterdir()):
    path.rmdir()
    return True
  return False


def manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
  """Asynchronous checkpoints in WORKDIR/checkpoints/<step>, keeping the newest `keep`, each
  with its checksums (see CHECKSUMS)."""
  checkpoints = epath.Path(absolute(workdir)) / CHECKPOINTS
  # cleanup_tmp_directories: deletes what a save killed half-way left behind.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=True, create=True,
      cleanup_tmp_directories=True, async_options=ocp.AsyncOptions(
          post_finalization_callback=lambda: _checksum_pending_save(checkpoints)))
  return ocp.CheckpointManager(checkpoints, options=options)


def _items(state, arg: Callable) -> Dict[str, Any]:
  """The checkpoint items of a state dataclass: `meta` (step, rng) and each other field, except
  empty ones (Orbax refuses an empty tree), each wrapped in `arg`."""
  items = {f.name: arg(getattr(state, f.name)) for f in dataclasses.fields(state)
           if f.name not in ("step", "rng") and jax.tree.leaves(getattr(state, f.name))}
  items["meta"] = arg({"step": state.step, "rng": state.rng})
  return items


def save(mngr: ocp.CheckpointManager, state, config: ml_collections.ConfigDict, *,
         force: bool = False) -> None:
  """Starts saving `state` (a train.TrainState or another state dataclass with `step` and
  `rng`) at its step; returns once arrays are copied."""
  step = int(state.step)
  if step in mngr.all_steps():
    return
  with _out_of_space_explained(mngr):
    mngr.save(step, force=force, args=ocp.args.Composite(
        **_items(state, ocp.args.StandardSave),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))))


def wait(mngr: ocp.CheckpointManager) -> None:
  """Waits for the save in flight (its errors surface here or at the next save), then closes."""
  with _out_of_space_explained(mngr):
    mngr.wait_until_finished()
  mngr.close()


def _is_out_of_space(error: BaseException) -> bool:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if "No space left on device" in str(error) or "ENOSPC" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


@contextlib.contextmanager
def _out_of_space_explained(mngr: ocp.CheckpointManager):
  """An asynchronous save that ran out of disk raises here (at the next save or wait) as an
  OSError(ENOSPC) that says which checkpoint was lost and which are intact: Orbax commits a step
  by renaming its temporary folder, so the failed one never counts, and it deletes old steps
  only after a commit, so none of those is lost."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-exception-caught
    if not _is_out_of_space(e):
      raise
    directory = epath.Path(mngr.directory)
    failed = sorted(p.name.split(".")[0] for p in directory.glob("*.orbax-checkpoint-tmp*"))
    intact = ocp.utils.checkpoint_steps(directory)
    raise OSError(errno.ENOSPC, (
        f"Out of disk space while saving the checkpoint of step {', '.join(failed) or '?'} in "
        f"{directory} ({_summary(e)}). That checkpoint was not committed; the checkpoints of "
        f"steps {sorted(intact)} are intact. Free some space (or lower "
        f"config.keep_checkpoints, or move the workdir to a larger disk) and run the same "
        f"command again: it resumes from step {max(intact, default=0)}.")) from e


def check_workdir(workdir: str, *, checkpoint_bytes: int, keep: int) -> None:
  """Raises OSError, before anything trains, when `workdir` is not writable or its disk lacks
  room for the checkpoints still to come (`keep` of `checkpoint_bytes`, plus one being written)."""
  path = epath.Path(workdir)
  probe = path / f".write_probe.{jax.process_index()}.{os.getpid()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("mae_jax checks that the workdir is writable\n")
    probe.unlink()
  except OSError as e:
    raise OSError(f"--workdir={workdir} is not writable ({type(e).__name__}: {e}); point "
                  f"--workdir at a directory this job can create and write.") from e
  if "://" in workdir:  # object stores (gs://...) report no free space
    return
  checkpoints = path / CHECKPOINTS
  existing = len(ocp.utils.checkpoint_steps(checkpoints)) if checkpoints.is_dir() else 0
  needed = max(1, keep + 1 - existing) * checkpoint_bytes
  free = shutil.disk_usage(path).free
  if free < needed:
    raise OSError(
        f"--workdir={workdir} has {free / 2**30:.2f} GiB free, but this run needs about "
        f"{needed / 2**30:.2f} GiB for its checkpoints ({checkpoint_bytes / 2**30:.2f} GiB each; "
        f"config.keep_checkpoints={keep} kept plus one being written, {existing} there now). "
        f"Free some space, lower config.keep_checkpoints, or point --workdir at a larger disk.")


def config_changes(saved: Dict[str, Any], config: ml_collections.ConfigDict
                   ) -> Tuple[List[str], List[str]]:
  """How `config` differs from a checkpoint's saved config, one "config.FIELD: ..." line per
  field: (the fields that make it another model, the others)."""
  old = traverse_util.flatten_dict(saved, sep=".")
  new = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep=".")
  model, other = [], []
  for key in sorted(old.keys() | new.keys()):
    if key in old and key in new and old[key] == new[key]:
      continue
    show = lambda d: repr(d[key]) if key in d else "not set"  # pylint: disable=cell-var-from-loop
    line = f"config.{key}: {show(old)} in the checkpoint, {show(new)} now"
    field = key.split(".", 1)
    is_model = key == "mode" or (field[0] == "model" and field[-1] not in EXECUTION_FIELDS)
    (model if is_model else other).append(line)
  return model, other


def _saved_config(path: epath.Path) -> Dict[str, Any]:
  """The config item of a step folder, read as the JSON file Orbax's JsonCheckpointHandler
  writes (not through a Checkpointer, whose restore is a barrier of all processes: a process
  that cannot read the file would leave the others waiting in it)."""
  try:
    return json.loads((path / "config" / "metadata").read_text())
  except ValueError as e:  # the JSON error alone does not say which file
    raise ValueError(f"{path / 'config'}: unreadable JSON ({e})") from None


def _read_description(path: epath.Path) -> Tuple[Optional[Dict[str, Any]], Any]:
  """A step folder's saved config (None if it has none) and the shapes of its params."""
  saved = None
  if (path / "config").exists():
    saved = _saved_config(path)
  return saved, _item_tree(path / PARAMS)


def _summary(error: BaseException) -> str:
  """The root cause of an error, type and first line, cut short (the outer TensorStore error
  is pages of spec; its cause names the file and what is wrong with it)."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines() or [""]
  return f"{type(error).__name__}: {lines[0][:400]}"


class WrongModelError(ValueError):
  """A checkpoint is of another model than the run's config."""


# Model fields that no param's shape shows: a checkpoint of another value loads without a shape
# error and computes something else.
_UNSEEN_FIELDS = {"num_heads": (), "decoder_num_heads": ("decoder_embed",)}


def unseen_model_differences(source: Optional[ml_collections.ConfigDict],
                             config: ml_collections.ConfigDict, params: Params,
                             path: str) -> List[str]:
  """One line per model field that `params` (loaded from `path`, whose config is `source`)
  were trained with another value of than `config.model` has, among those no shape shows
  (the attention heads); [] without a source config."""
  if source is None or "model" not in source:
    return []
  lines = []
  for field, needs in _UNSEEN_FIELDS.items():
    if field in source.model and field in config.model and all(k in params for k in needs):
      if source.model[field] != config.model[field]:
        lines.append(f"config.model.{field}={config.model[field]!r}, but the params in {path} "
                     f"were trained with {source.model[field]!r}")
  return lines


def _check_same_model(path: epath.Path, saved: Optional[Dict[str, Any]],
                      config: Optional[ml_collections.ConfigDict], stored_params: Any,
                      expected_params: Any) -> None:
  """WrongModelError naming what differs when the checkpoint at `path` is of another model."""
  advice = (f"Use a new --workdir for this config, or set those fields back to the checkpoint's "
            f"(its whole config is in {path}/config/metadata).")
  if saved is not None and config is not None:
    old_mode, new_mode = saved.get("mode", "pretrain"), config.get("mode", "pretrain")
    if old_mode != new_mode:  # e.g. fine-tuning into the pretraining's own workdir
      workdir = path.parent.parent
      start = (f", with --config.init_from={workdir} to start from this {old_mode} run"
               if new_mode != "pretrain" else "")
      raise WrongModelError(f"{path} is a checkpoint of a {old_mode} run, and this config is a "
                            f"{new_mode} one: give the {new_mode} run its own --workdir{start}.")
    model, other = config_changes(saved, config)
    if model:
      raise WrongModelError(f"{path} is a checkpoint of another model than this config's: "
                            + "; ".join(model) + ". " + advice)
    if other:
      logging.warning("Resuming from %s with these config changes: %s.", path, "; ".join(other))
  problems = shape_problems(stored_params, expected_params)
  if problems:
    raise WrongModelError(f"The params in {path} do not fit this config's model (check "
                          f"config.model): " + "; ".join(problems[:8]) + ". " + advice)


def _set_aside(mngr: ocp.CheckpointManager, steps: List[int]) -> None:
  """Moves damaged step folders to WORKDIR/damaged_checkpoints/, so that the run can write those
  steps again and nothing reads them by mistake; kept for a post-mortem, not deleted."""
  if jax.process_index() == 0:
    damaged = epath.Path(mngr.directory).parent / DAMAGED
    damaged.mkdir(parents=True, exist_ok=True)
    for step in steps:
      target = damaged / str(step)
      n = 1
      while target.exists():  # the same step may be damaged again in a later run
        target, n = damaged / f"{step}.{n}", n + 1
      writers.move_tree(epath.Path(mngr.directory) / str(step), target)
      logging.warning("Moved the damaged checkpoint of step %d to %s.", step, target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mae_jax: damaged checkpoints set aside")
  mngr.reload()


def _same_on_every_process(steps: List[int]) -> List[int]:
  """Process 0's list of steps, on every process (each may see another listing of a shared
  folder, e.g. a checkpoint not yet visible to all)."""
  if jax.process_count() == 1:
    return steps
  longest = int(multihost_utils.process_allgather(np.int32(len(steps))).max())
  padded = np.full((longest,), -1, np.int64)
  padded[:len(steps)] = steps
  return [int(s) for s in multihost_utils.broadcast_one_to_all(padded) if s >= 0]


def _readable_everywhere(ok: bool) -> np.ndarray:
  """Whether each process found a checkpoint readable ([process_count] bool)."""
  if jax.process_count() == 1:
    return np.asarray([ok])
  return np.asarray(multihost_utils.process_allgather(np.int32(ok))).reshape(-1).astype(bool)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state,
                   config: Optional[ml_collections.ConfigDict] = None):
  """The newest checkpoint that every process can read, restored into `abstract_state`'s shapes
  and shardings; None when there is none.

  A half-written checkpoint is never a candidate (see the module docstring). From the newest
  down, each process checks a step (its metadata and saved config, then every file against its
  checksums); the processes agree on the newest step that all of them can read, and restore that
  one together, so that they never resume from different steps. The newer ones, damaged for at
  least one process, are logged with their error and set aside. WrongModelError when a
  checkpoint is of another model than `config` (or `abstract_state`); RuntimeError when
  checkpoints exist but none restores, rather than silently starting from scratch.
  """
  failures = []
  for step in _same_on_every_process(sorted(mngr.all_steps(), reverse=True)):
    path = epath.Path(mngr.directory) / str(step)
    error = None
    try:
      if not path.is_dir():
        raise FileNotFoundError(f"{path} is not visible to process {jax.process_index()}")
      saved, stored_params = _read_description(path)
      _check_same_model(path, saved, config, stored_params, abstract_state.params)
      verify_checksums(path)
    except WrongModelError:
      raise
    # TensorStore reports a truncated or missing file as a bare Exception: anything that stops a
    # committed checkpoint from reading means it is damaged.
    except Exception as e:  # pylint: disable=broad-exception-caught
      error = e
    readable = _readable_everywhere(error is None)
    if readable.all():
      items = _items(abstract_state, ocp.args.StandardRestore)
      afresh = _loss_scale_afresh(path, items, abstract_state)
      try:
        restored = mngr.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-exception-caught
        error = e
      readable = _readable_everywhere(error is None)  # all restored it, or all go on
      if readable.all():
        if failures:
          _set_aside(mngr, [s for s, _ in failures])
        logging.info("Resumed from %s.", path)
        return abstract_state.replace(**{k: restored[k] for k in items if k != "meta"},
                                      **afresh, step=restored["meta"]["step"],
                                      rng=restored["meta"]["rng"])
    if error is None:
      error = RuntimeError(f"process(es) {np.flatnonzero(~readable).tolist()} cannot read it")
    failures.append((step, error))
    logging.warning("The checkpoint %s is damaged, trying the one before it: %s", path,
                    _summary(error))
  if failures:
    raise RuntimeError(
        f"No checkpoint in {mngr.directory} restores, so the run stops instead of starting from "
        f"scratch. " + "; ".join(f"step {s}: {_summary(e)}" for s, e in failures) + ". Restore "
        f"them from a backup, or move {mngr.directory} away to start afresh.")
  return None


def _loss_scale_afresh(path: epath.Path, items: Dict[str, Any], abstract_state) -> Dict[str, Any]:
  """{"loss_scale": a fresh float16 loss scale} when the state to restore scales its loss and the
  checkpoint at `path` has no scale (saved computing in float32 or bfloat16, resumed with
  model.dtype float16), removing it from `items`; {} otherwise. The other way round needs
  nothing: a float16 checkpoint's scale is simply not read."""
  if "loss_scale" not in items or (path / "loss_scale").exists():
    return {}
  del items["loss_scale"]
  logging.info("%s was saved without float16 loss scaling: the loss scale starts afresh at %g.",
               path, loss_scale.INIT_SCALE)
  return {"loss_scale": jax.tree.map(lambda value, target: jax.device_put(value, target.sharding),
                                     loss_scale.init(jnp.float16), abstract_state.loss_scale)}


def save_params(workdir: str, params: Params, config: ml_collections.ConfigDict, *,
                batch_stats: Optional[Params] = None) -> None:
  """Writes WORKDIR/params (Orbax), a linear probe's WORKDIR/batch_stats and
  WORKDIR/config.json, replacing earlier ones. The earlier config.json and batch_stats are
  removed first: they belong to the params being replaced, and a crash before this call ends
  must not pair them with the new params (config.json is written last)."""
  root = epath.Path(absolute(workdir))
  if jax.process_index() == 0:
    if (root / BATCH_STATS).exists():
      (root / BATCH_STATS).rmtree()
    (root / CONFIG_JSON).unlink(missing_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(epath.Path(absolute(workdir)) / PARAMS, params, force=True)
  if batch_stats:
    checkpointer.save(epath.Path(absolute(workdir)) / BATCH_STATS, batch_stats, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    for item in (PARAMS, BATCH_STATS) if batch_stats else (PARAMS,):
      write_checksums(epath.Path(absolute(workdir)) / item)
    write_config(workdir, config)


def has_checkpoints(workdir: str) -> bool:
  """Whether WORKDIR/checkpoints holds a committed step (the workdir of a run that has saved);
  process 0's answer on every process, so that all restore or all start afresh together."""
  checkpoints = epath.Path(absolute(workdir)) / CHECKPOINTS
  found = checkpoints.is_dir() and bool(ocp.utils.checkpoint_steps(checkpoints))
  if jax.process_count() > 1:
    found = bool(multihost_utils.broadcast_one_to_all(np.int32(found)))
  return found


def has_params(workdir: str) -> bool:
  """Whether WORKDIR/params exists (e.g. written by mae_jax.convert)."""
  return (epath.Path(workdir) / PARAMS).exists()


def _on_one_device(metadata_tree) -> Any:
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                      metadata_tree)


def _leaves(tree: Any) -> Dict[str, Any]:
  """{"a/b/c": leaf} of a nested tree (dicts, FrozenDicts or Orbax metadata)."""
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shape_problems(found: Any, expected: Any, *, optional: Sequence[str] = ()) -> List[str]:
  """One line per place where two trees of shaped leaves (arrays, ShapeDtypeStructs, Orbax
  metadata) differ: "a/b/c is missing", "... is not in the model", "... has shape (..), the model
  expects (..)". `optional`: top-level names that may be absent all together (an encoder-only
  checkpoint's decoder, convert.DECODER_PARAMS); one of them absent alone is still missing."""
  found, expected = _leaves(found), _leaves(expected)
  top = lambda path: path.split("/", 1)[0]
  if optional and not any(top(p) in optional for p in found):
    expected = {p: e for p, e in expected.items() if top(p) not in optional}
  problems = [f"{p} is missing" for p in expected if p not in found]
  problems += [f"{p} is not in the model" for p in found if p not in expected]
  problems += [f"{p} has shape {tuple(found[p].shape)}, the model expects {tuple(e.shape)}"
               for p, e in expected.items() if p in found and tuple(found[p].shape) !=
               tuple(e.shape)]
  return problems


def _params_in(path: epath.Path) -> Optional[Tuple[epath.Path, Optional[Callable[[], Any]]]]:
  """(params dir, config reader) of a training step directory or a params directory."""
  if (path / PARAMS).is_dir():
    if (path / "config").is_dir():  # a training checkpoint's own config item
      return path / PARAMS, lambda: ml_collections.ConfigDict(_saved_config(path))
    return path / PARAMS, _config_reader(path / CONFIG_JSON)
  if (path / "_METADATA").exists():
    if (path.parent / "config").is_dir():  # the params/ of a training step: its config item
      return path, lambda: ml_collections.ConfigDict(_saved_config(path.parent))
    return path, _config_reader(path.parent / CONFIG_JSON)
  return None


def _params_candidates(path: str) -> List[Tuple[epath.Path, Optional[Callable[[], Any]]]]:
  """What `path` offers, best first: a workdir's training checkpoints newest first, then its
  params/; else the step directory or params directory `path` itself."""
  path = epath.Path(absolute(path))
  if path.name == CHECKPOINTS and not (path / CHECKPOINTS).exists():
    path = path.parent  # a workdir's checkpoints/ folder: that workdir
  found = []
  checkpoints = path / CHECKPOINTS
  if checkpoints.is_dir():
    for step in sorted(ocp.utils.checkpoint_steps(checkpoints), reverse=True):
      found.append(_params_in(checkpoints / str(step)))
  found.append(_params_in(path))
  found = [f for f in found if f is not None]
  if not found:
    if not path.exists():
      raise FileNotFoundError(f"{path} does not exist: expected a workdir of mae_jax.main or "
                              "mae_jax.convert, or an npz written by mae_jax.export.")
    if _is_torch_checkpoint(path):
      raise FileNotFoundError(_convert_first(path, "a PyTorch or transformers checkpoint"))
    if checkpoints.is_dir():
      raise FileNotFoundError(f"{checkpoints} holds no finished checkpoint yet: its run has not "
                              "saved one (it saves every config.checkpoint_every_steps steps and "
                              "at the end), or stopped before it did.")
    raise FileNotFoundError(
        f"No params under {path}: expected a workdir with {CHECKPOINTS}/<step>/ or {PARAMS}/ "
        f"(written by mae_jax.main or mae_jax.convert), a params directory, or an npz written "
        f"by mae_jax.export.")
  return found


_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def _is_torch_checkpoint(path: epath.Path) -> bool:
  """Whether `path` looks like what mae_jax.convert reads rather than mae_jax's own params: a
  .pth/.bin/.safetensors file, or a directory holding transformers' weight files."""
  if path.is_file():
    return path.suffix in _TORCH_SUFFIXES
  return path.is_dir() and any((path / name).exists() for name in (
      "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"))


def _convert_first(path: epath.Path, what: str) -> str:
  return (f"{path} is {what}, which mae_jax reads once converted: run `python -m "
          f"mae_jax.convert --torch_checkpoint={path} --workdir=DIR`, then pass DIR.")


def _is_npz(path: str) -> bool:
  """Whether `path` is a file in numpy's npz (zip) format, whatever its name ends with."""
  path = epath.Path(path)
  if not path.is_file():
    return False
  with path.open("rb") as f:
    return f.read(4) == b"PK\x03\x04"


def _verify_item(item: epath.Path) -> None:
  """Checks an item folder against its own checksums (WORKDIR/params) or its step's."""
  if not verify_checksums(item):
    verify_checksums(item.parent, under=item.name)


def _item_tree(item_dir: epath.Path) -> Any:
  """The array metadata tree of one saved item (params/, batch_stats/). Read through the
  handler: a Checkpointer's metadata() also looks for a step's _CHECKPOINT_METADATA, which the
  items of a training step do not have, and warns that it is missing for every sound one."""
  return ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir)).tree


def load_variables(path: str, *, target: Any = None, optional: Sequence[str] = ()
                   ) -> Tuple[Params, Params, Optional[ml_collections.ConfigDict]]:
  """(params, batch_stats, config or None) from a workdir's newest training checkpoint or its
  params/, a step or params directory, or an encoder exported by `mae_jax.export` (an npz,
  whatever its file name; no config). `batch_stats` ({} if none): a linear probe's BatchNorm
  statistics, stored beside those params.

  A workdir's newest checkpoint that fails to read (a crash damaged it) is skipped with a
  warning for the one before it; nothing is moved (that is restore_latest's job). `target`:
  ShapeDtypeStructs (with shardings) to restore the params into; checked against the stored
  shapes first, a WrongModelError naming the params that differ. `optional`: top-level parts of
  `target` that the stored params may lack all together (convert.DECODER_PARAMS: an
  encoder-only checkpoint), left out of the result then. Without `target` the arrays land on
  one local device.
  """
  if _is_npz(path):
    from mae_jax import export  # pylint: disable=g-import-not-at-top
    encoder = export.load_encoder_params(path)
    keys = list(traverse_util.flatten_dict(encoder, sep="/"))
    if not any("/" in k for k in keys) and any("." in k for k in keys):  # an npz of torch keys
      raise ValueError(_convert_first(epath.Path(path), "an npz of PyTorch keys"))
    params = export.from_big_vision(encoder)
    if target is not None:
      problems = shape_problems(params, target)
      if problems:
        raise WrongModelError(f"The params in {path} do not fit the config's model (check "
                              f"config.model): " + "; ".join(problems[:8]))
    return params, {}, None
  failures = []
  for params_dir, read_config in _params_candidates(path):
    checkpointer = ocp.StandardCheckpointer()
    try:
      stored = _item_tree(params_dir)
      if target is None:
        want = _on_one_device(stored)
      else:
        problems = shape_problems(stored, target, optional=optional)
        want = {k: v for k, v in target.items() if k in stored or k not in optional}
        if problems:
          raise WrongModelError(f"The params in {params_dir} do not fit the config's model "
                                f"(check config.model): " + "; ".join(problems[:8]))
      _verify_item(params_dir)
      params = checkpointer.restore(params_dir, want)
      stats_dir = params_dir.parent / BATCH_STATS
      batch_stats = {}
      if (stats_dir / "_METADATA").exists():
        _verify_item(stats_dir)
        batch_stats = checkpointer.restore(stats_dir, _on_one_device(_item_tree(stats_dir)))
      config = read_config() if read_config else None
    except WrongModelError:
      raise
    # As in restore_latest: TensorStore reports a truncated or missing file as a bare Exception.
    except Exception as e:  # pylint: disable=broad-exception-caught
      failures.append((params_dir, e))
      logging.warning("Could not read the params in %s, trying the next older ones: %s",
                      params_dir, _summary(e))
      continue
    if failures:
      logging.warning("Loaded the params of %s instead (%d newer one(s) damaged).", params_dir,
                      len(failures))
    return params, batch_stats, config
  raise RuntimeError(f"None of the params under {path} reads: " + "; ".join(
      f"{d}: {_summary(e)}" for d, e in failures))


def load_params(path: str, *, target: Any = None, optional: Sequence[str] = ()
                ) -> Tuple[Params, Optional[ml_collections.ConfigDict]]:
  """(params, config or None) from any source `load_variables` reads (see there)."""
  params, _, config = load_variables(path, target=target, optional=optional)
  return params, config


# --- one run per workdir --------------------------------------------------------------------------
LOCK = "run.lock"


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir."""


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process: alive
    return True
  return True


class WorkdirLock:
  """WORKDIR/run.lock: one run per workdir, taken at start and released at the end.

  The lock names the host and process id of its run and carries a heartbeat that a thread
  renews every `heartbeat_s` seconds. A second run refuses to start, naming them. A lock is
  stale, and taken over with a warning, when its run is gone: a process id no longer alive on
  this host (same boot), a host that has rebooted since, or no heartbeat for `stale_after_s`
  (a run on another host that died, or its whole machine). In a multi-host job only process 0
  takes it, and every process learns the outcome (a broadcast), so all start or all refuse.

  On a local or shared file system the lock file is created with O_CREAT | O_EXCL, which one
  run alone can win. Object stores (gs://) have no such operation through epath: the lock is
  written, then read back after a second, and a run whose token is not the one read back
  refuses; two runs that start within that second of each other can both pass.
  """

  def __init__(self, workdir: str, *, heartbeat_s: float = 30.0, stale_after_s: float = 600.0):
    self.path = epath.Path(absolute(workdir)) / LOCK
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    self._token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self.held = False

  def _record(self) -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
                       "token": self._token, "started": self._started,
                       "heartbeat": time.time()}, indent=1) + "\n"

  def _create(self) -> bool:
    """Writes the lock unless one exists; whether this run now holds it."""
    if "://" not in str(self.path):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(self._record())
      return True
    if self.path.exists():
      return False
    self.path.write_text(self._record())
    time.sleep(1.0)
    return (self._holder() or {}).get("token") == self._token

  def _holder(self) -> Optional[Dict[str, Any]]:
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):  # gone, or caught mid-write
      return None

  def _stale(self, holder: Optional[Dict[str, Any]]) -> Optional[str]:
    """Why the lock's run is gone, or None when it may be alive."""
    if holder is None:
      try:
        age = time.time() - self.path.stat().mtime
      except OSError:
        return "the lock vanished"
      return f"an unreadable lock {age:.0f} s old" if age > self.stale_after_s else None
    if holder.get("host") == socket.gethostname():
      if holder.get("boot_id") and holder.get("boot_id") != _boot_id():
        return f"host {holder['host']} has rebooted since"
      if not _pid_alive(int(holder.get("pid", -1))):
        return f"process {holder.get('pid')} on this host ({holder['host']}) has exited"
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > self.stale_after_s:
      return f"no heartbeat from it for {age:.0f} s"
    return None

  def _take(self) -> None:
    for _ in range(3):
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if self._create():
        return
      holder = self._holder()
      reason = self._stale(holder)
      if reason is None:
        who = (f"process {holder['pid']} on host {holder['host']} (started {holder['started']}, "
               f"last heartbeat {time.time() - float(holder['heartbeat']):.0f} s ago)"
               if holder else "a run whose lock is being written")
        raise WorkdirBusyError(
            f"{self.path.parent} is in use by another run: {who}. One workdir holds one run: "
            f"wait for that run to end or stop it, or use another --workdir. If that run is "
            f"gone, delete {self.path}.")
      logging.warning("Taking over %s from a run that is gone (%s): %s", self.path, reason,
                      holder)
      try:
        self.path.unlink()
      except FileNotFoundError:
        pass
    raise WorkdirBusyError(f"Could not take {self.path}: other runs keep taking it.")

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        if (self._holder() or {}).get("token") == self._token:
          self.path.write_text(self._record())
      except OSError as e:  # a full or unreachable disk must not stop training
        logging.warning("Could not renew %s: %s", self.path, e)

  def acquire(self) -> "WorkdirLock":
    """Takes the lock (process 0) or raises WorkdirBusyError on every process."""
    self._started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    error = None
    if jax.process_index() == 0:
      try:
        self._take()
        self.held = True
      except WorkdirBusyError as e:
        error = e
    if jax.process_count() > 1:
      ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
      if not ok and error is None:
        error = WorkdirBusyError(f"Process 0 could not take {self.path}; its log says why.")
    if error is not None:
      raise error
    if self.held:
      self._thread = threading.Thread(target=self._beat, name="mae_jax workdir lock",
                                      daemon=True)
      self._thread.start()
    return self

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if this run still holds it."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self.held and (self._holder() or {}).get("token") == self._token:
      self.path.unlink()
    self.held = False

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
