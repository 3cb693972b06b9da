"""Checkpoints of a run: the train state plus the data iterator state, via Orbax.

Owns the checkpoint directory `<workdir>/checkpoints`: which steps are kept (the
last K plus, optionally, every epoch's), saving (synchronous, so a step folder
that exists is complete unless the process died inside Orbax's final rename),
and resuming from the newest step that restores. A step folder that does not
restore (empty, or cut off by a kill) is moved to `<workdir>/checkpoints_unrestorable`
with a warning, so later saves of that step do not collide with it.
"""

import errno
import json
import os
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
# grain is imported only where the data iterator state is saved or restored, so that
# sampling and the GPU benchmarks (whose machines lack grain) can import this module.

_CHECKPOINT_SUBDIR = 'checkpoints'
_UNRESTORABLE_SUBDIR = 'checkpoints_unrestorable'
# Orbax writes this file when a step is committed; a folder without it is partial.
_COMMIT_MARKER = '_CHECKPOINT_METADATA'


class _IteratorState:
  """An iterator state as grain's Orbax handler wants it: JSON bytes per host.

  grain's handler writes `process_<i>-of-<n>.json` on every host, which a plain
  `ocp.args.JsonSave` (primary host only) would not.
  """

  def __init__(self, state: Any = None):
    self.state = state

  def get_state(self) -> bytes:
    return json.dumps(self.state).encode()

  def set_state(self, raw: bytes) -> None:
    self.state = json.loads(raw)

  def start_prefetch(self) -> None:
    pass  # Called by grain's handler after restore; nothing runs ahead here.


def plain_os_error(error: BaseException, path: str, action: str) -> OSError | None:
  """An OSError saying in words why `action` on `path` failed, or None if unrelated.

  Walks the exception chain (Orbax and tensorstore wrap the OS error).
  """
  seen = error
  while seen is not None:
    code = getattr(seen, 'errno', None)
    if code == errno.ENOSPC or 'No space left' in str(seen):
      return OSError(errno.ENOSPC, f'Cannot {action} {path}: the disk is full. '
                     'Free space or point --workdir at another disk.')
    if code in (errno.EACCES, errno.EROFS, errno.EPERM) or 'Permission denied' in str(seen):
      return OSError(errno.EACCES, f'Cannot {action} {path}: the directory is not '
                     'writable. Fix its permissions or choose another --workdir.')
    seen = seen.__cause__ or seen.__context__
  return None


def ensure_writable(directory: str) -> None:
  """Creates `directory` and proves it writable, or raises a plain OSError."""
  try:
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f'.write_probe_{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise (plain_os_error(e, directory, 'write to') or e) from e


def create_manager(workdir: str, train_config, steps_per_epoch: int) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last `train.keep_checkpoints` steps, plus epochs.

  Args:
    workdir: run directory; checkpoints go to `<workdir>/checkpoints/<step>`.
    train_config: `config.train` (keep_checkpoints, keep_epoch_checkpoints).
    steps_per_epoch: steps per epoch; epoch ends are the multiples of it.
  """
  directory = os.path.join(os.path.abspath(workdir), _CHECKPOINT_SUBDIR)
  ensure_writable(directory)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=train_config.keep_checkpoints,
      keep_period=steps_per_epoch if train_config.keep_epoch_checkpoints else None,
      create=True,
      cleanup_tmp_directories=True,
      # Synchronous: a returned save is on disk, so a kill right after keeps it.
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, options=options)


def open_manager(workdir: str) -> ocp.CheckpointManager:
  """A read-only manager of an existing `<workdir>/checkpoints` (for sampling)."""
  directory = os.path.join(os.path.abspath(workdir), _CHECKPOINT_SUBDIR)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'No checkpoint directory {directory}; train first '
                            f'(--mode=train --workdir={workdir}).')
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Any) -> str:
  """Writes the train state and the data iterator state as checkpoint `step`.

  The state is saved as host (numpy) arrays: Orbax writes them about 3x faster than
  device arrays, whose per-array cost dominates for a U-Net's hundreds of small leaves
  (bench/epoch_end.py). Process 0 alone writes host arrays, which is right because the
  train state is replicated, so every process holds all of it; they restore into any
  sharding. (A state sharded over several processes would fail in `jax.device_get`.)

  Returns:
    The step folder's path.
  Raises:
    OSError: disk full or unwritable directory, said plainly.
  """
  import grain  # pylint: disable=g-import-not-at-top
  args = ocp.args.Composite(
      state=ocp.args.StandardSave(jax.device_get(state)),
      data=grain.checkpoint.CheckpointSave(_IteratorState(data_state)))
  path = os.path.join(str(manager.directory), str(step))
  try:
    manager.save(step, args=args, force=True)
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    plain = plain_os_error(e, path, 'save checkpoint to')
    if plain is not None:
      raise plain from e
    raise
  return path


def abstract_with_sharding(abstract_state: Any, sharding: Any) -> Any:
  """ShapeDtypeStructs of `abstract_state` carrying the target `sharding` pytree."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, sharding)


def _is_committed(step_dir: str) -> bool:
  return os.path.exists(os.path.join(step_dir, _COMMIT_MARKER))


def _move_aside(manager: ocp.CheckpointManager, step: int) -> None:
  """Moves an unrestorable step folder out of the manager's directory."""
  directory = str(manager.directory)
  target_dir = os.path.join(os.path.dirname(directory), _UNRESTORABLE_SUBDIR)
  if jax.process_index() == 0:
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    os.rename(os.path.join(directory, str(step)), target)
    logging.warning('Moved unrestorable checkpoint folder to %s.', target)


def _array_specs(tree: Any) -> dict[str, str]:
  """{'params/downs_0_attn/norm/g': '(16,) float32'} for a tree of arrays, of
  ShapeDtypeStructs or of Orbax's saved ArrayMetadata (the same paths in all three)."""
  def name(path):
    return '/'.join(str(getattr(key, 'name', getattr(key, 'key', getattr(key, 'idx', key))))
                    for key in path)
  return {name(path): f'{tuple(leaf.shape)} {np.dtype(leaf.dtype).name}'
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def describe_state_mismatch(step_dir: str, abstract_state: Any) -> str:
  """Which arrays of the train state saved in `step_dir` differ from `abstract_state`.

  Returns:
    e.g. '628 of 656 arrays differ in shape or dtype, e.g. params/downs_0_attn/norm/g:
    saved (8,) float32, this config (16,) float32; ...', and the arrays only one side
    has; '' when the saved metadata is unreadable or all arrays agree.
  """
  handler = ocp.StandardCheckpointHandler()
  try:
    saved = _array_specs(handler.metadata(epath.Path(step_dir) / 'state').tree)
  except Exception:  # pylint: disable=broad-except
    return ''  # A partial or foreign folder: the restore error says enough.
  finally:
    handler.close()
  wanted = _array_specs(abstract_state)
  differ = [name for name in wanted if name in saved and saved[name] != wanted[name]]
  only_saved = [name for name in saved if name not in wanted]
  only_wanted = [name for name in wanted if name not in saved]
  parts = []
  if differ:
    # The model's own params say most; EMA and optimizer copies repeat them.
    shown = ([name for name in differ if name.startswith('params/')] or differ)[:3]
    parts.append(f'{len(differ)} of {len(wanted)} arrays differ in shape or dtype, e.g. '
                 + '; '.join(f'{name}: saved {saved[name]}, this config {wanted[name]}'
                             for name in shown))
  if only_saved:
    parts.append(f'arrays only in the checkpoint: {len(only_saved)}, e.g. {only_saved[0]}')
  if only_wanted:
    parts.append(f'arrays only in this config: {len(only_wanted)}, e.g. {only_wanted[0]}')
  return '; '.join(parts)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   restore_data: bool = True, move_aside: bool = True
                   ) -> tuple[Any, Any, int] | None:
  """Restores the newest step that restores; skips partial folders with a warning.

  Args:
    manager: from `create_manager`.
    abstract_state: TrainState of ShapeDtypeStructs with shardings (what to build).
    restore_data: also read the data iterator state (False for sampling).
    move_aside: move unrestorable newer folders out of the way (False: read only).

  Returns:
    (state, data_state, step), or None when the directory holds no checkpoint, or
    only partial ones (which are moved aside).
  Raises:
    RuntimeError: complete-looking checkpoints exist but none restores (e.g. the
      config changed shapes); the message names the steps and the first error.
  """
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    step_dir = os.path.join(str(manager.directory), str(step))
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if restore_data:
      import grain  # pylint: disable=g-import-not-at-top
      items['data'] = grain.checkpoint.CheckpointRestore(_IteratorState())
    mismatch = describe_state_mismatch(step_dir, abstract_state)
    if mismatch:
      # Orbax's own failed restore would flood the log with tracebacks.
      logging.warning('Skipping checkpoint %s: it was saved by another model or '
                      'optimizer.', step_dir)
      failures.append((step, _is_committed(step_dir),
                       ValueError(f'it was saved by another model or optimizer: {mismatch}')))
      continue
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Skipping checkpoint %s: it does not restore (%s: %s).',
                      step_dir, type(e).__name__, e)
      failures.append((step, _is_committed(step_dir), e))
      continue
    if move_aside and failures:
      for bad_step, _, _ in failures:
        _move_aside(manager, bad_step)
      manager.reload()
    data_state = restored['data'].state if restore_data else None
    return restored['state'], data_state, step
  complete = [(s, e) for s, committed, e in failures if committed]
  if complete:
    step, error = complete[0]
    raise RuntimeError(
        f'No checkpoint under {manager.directory} restores (tried steps '
        f'{[s for s, _, _ in failures]}). Step {step} failed with '
        f'{type(error).__name__}: {error}. Does the config (model, optim) match the '
        'run that wrote them? Use a fresh --workdir to start over.') from error
  if move_aside and failures:
    for bad_step, _, _ in failures:
      _move_aside(manager, bad_step)
    manager.reload()
  return None


def restore_step(manager: ocp.CheckpointManager, step: int, abstract_state: Any
                 ) -> tuple[Any, None, int]:
  """Restores the train state of one given step (no data state).

  Raises:
    FileNotFoundError: the step is not among the manager's checkpoints.
  """
  if step not in manager.all_steps():
    raise FileNotFoundError(f'No checkpoint step {step} under {manager.directory}; '
                            f'available: {sorted(manager.all_steps())}.')
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  return restored['state'], None, step


def latest_path(manager: ocp.CheckpointManager) -> str | None:
  """Path of the newest checkpoint step folder, or None."""
  step = manager.latest_step()
  return None if step is None else os.path.join(str(manager.directory), str(step))
