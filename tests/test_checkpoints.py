"""Tests of eo_ddpm_jax.checkpoints: keep policy, partial folders, plain OS errors."""

import errno
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from eo_ddpm_jax import checkpoints


def _train_config(keep=2, epochs=True):
  return ml_collections.ConfigDict(dict(keep_checkpoints=keep, keep_epoch_checkpoints=epochs))


def _state(value):
  return {'w': jnp.full((3,), value, jnp.float32), 'step': jnp.asarray(value, jnp.int32)}


def _abstract(state):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return checkpoints.abstract_with_sharding(
      jax.eval_shape(lambda: state), jax.tree.map(lambda _: device, state))


def test_keeps_last_k_and_epoch_checkpoints(tmp_path):
  manager = checkpoints.create_manager(str(tmp_path), _train_config(keep=2), steps_per_epoch=4)
  for step in range(1, 11):
    checkpoints.save(manager, step, _state(step), {'position': step})
  # Last two (9, 10) plus the epoch ends 4 and 8.
  assert sorted(manager.all_steps()) == [4, 8, 9, 10]


def test_restores_latest_state_and_data_state(tmp_path):
  manager = checkpoints.create_manager(str(tmp_path), _train_config(), steps_per_epoch=4)
  for step in (1, 2, 3):
    checkpoints.save(manager, step, _state(step), {'position': step * 10})
  state, data_state, step = checkpoints.restore_latest(manager, _abstract(_state(0)))
  assert step == 3 and data_state == {'position': 30}
  np.testing.assert_array_equal(state['w'], [3.0, 3.0, 3.0])


def test_partial_and_empty_step_folders_are_skipped_with_warning(tmp_path, caplog):
  manager = checkpoints.create_manager(str(tmp_path), _train_config(keep=5), steps_per_epoch=4)
  checkpoints.save(manager, 2, _state(2), {'position': 2})
  ckpt_dir = tmp_path / 'checkpoints'
  (ckpt_dir / '3' / 'state').mkdir(parents=True)  # Cut off inside a save.
  (ckpt_dir / '4').mkdir()  # Empty.
  manager = checkpoints.create_manager(str(tmp_path), _train_config(keep=5), steps_per_epoch=4)
  assert sorted(manager.all_steps()) == [2, 3, 4]  # Orbax counts them as checkpoints.
  with caplog.at_level('WARNING'):
    state, data_state, step = checkpoints.restore_latest(manager, _abstract(_state(0)))
  assert step == 2 and data_state == {'position': 2}
  np.testing.assert_array_equal(state['w'], [2.0, 2.0, 2.0])
  assert 'Skipping checkpoint' in caplog.text and os.fspath(ckpt_dir / '4') in caplog.text
  # Moved aside, so saving steps 3 and 4 again works.
  assert sorted(manager.all_steps()) == [2]
  assert len(os.listdir(tmp_path / 'checkpoints_unrestorable')) == 2
  checkpoints.save(manager, 3, _state(3), {'position': 3})
  assert sorted(manager.all_steps()) == [2, 3]


def test_only_partial_folders_start_fresh(tmp_path):
  (tmp_path / 'checkpoints' / '1').mkdir(parents=True)
  manager = checkpoints.create_manager(str(tmp_path), _train_config(), steps_per_epoch=4)
  assert checkpoints.restore_latest(manager, _abstract(_state(0))) is None


def test_complete_but_mismatched_checkpoint_raises(tmp_path):
  manager = checkpoints.create_manager(str(tmp_path), _train_config(), steps_per_epoch=4)
  checkpoints.save(manager, 1, _state(1), {'position': 1})
  other = {'w': jnp.zeros((5,), jnp.float32), 'step': jnp.asarray(0, jnp.int32)}
  with pytest.raises(RuntimeError, match=r'No checkpoint .* restores .* config') as raised:
    checkpoints.restore_latest(manager, _abstract(other))
  # The message names the array and both shapes, from the saved metadata.
  assert ('Step 1 failed with ValueError: it was saved by another model or optimizer: '
          '1 of 2 arrays differ in shape or dtype, e.g. w: saved (3,) float32, this config '
          '(5,) float32.' in str(raised.value))
  assert sorted(manager.all_steps()) == [1]  # Left in place.
  renamed = {'v': jnp.zeros((3,), jnp.float32), 'step': jnp.asarray(0, jnp.int32)}
  assert checkpoints.describe_state_mismatch(str(tmp_path / 'checkpoints' / '1'),
                                             _abstract(renamed)) == (
      'arrays only in the checkpoint: 1, e.g. w; arrays only in this config: 1, e.g. v')
  assert checkpoints.describe_state_mismatch(str(tmp_path / 'checkpoints' / '1'),
                                             _abstract(_state(0))) == ''
  assert checkpoints.describe_state_mismatch(str(tmp_path / 'missing'), _abstract(other)) == ''


def test_unwritable_workdir_is_said_plainly():
  # /sys refuses new folders even to root (file permissions would not stop root).
  with pytest.raises(OSError, match='not writable'):
    checkpoints.create_manager('/sys/eo_ddpm_jax_test', _train_config(), steps_per_epoch=4)


def test_disk_full_is_said_plainly(tmp_path, monkeypatch):
  manager = checkpoints.create_manager(str(tmp_path), _train_config(), steps_per_epoch=4)

  def full(*args, **kwargs):
    try:
      raise OSError(errno.ENOSPC, 'No space left on device')
    except OSError as e:
      raise ValueError('tensorstore write failed') from e  # Wrapped, as Orbax does.

  monkeypatch.setattr(manager, 'save', full)
  with pytest.raises(OSError, match='disk is full'):
    checkpoints.save(manager, 1, _state(1), {'position': 1})
