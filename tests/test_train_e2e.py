"""End-to-end training through the real CLI on a tiny synthetic SEN12MS build.

Each run is a subprocess of `python -m eo_ddpm_jax.main` (XLA flags such as the
forced CPU device count are read at import). They share a persistent compilation
cache, so identical programs compile once; a cached program is the same binary,
which is what makes the kill-and-resume comparison bitwise on CPU.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from tests import cli_helpers

ROOT = cli_helpers.ROOT
NUM_PATCHES = 16  # 2 scenes x 8 patches, all in the 'train+test' split.
BATCH = 4  # -> 4 steps per epoch.
EPOCHS = 2
FINAL_STEP = NUM_PATCHES // BATCH * EPOCHS
TINY = [  # A tiny U-Net on 16x16 with T = 20, small enough to compile quickly.
    '--config.data.image_size=16', '--config.model.dim=8', '--config.model.dim_mults=(1,2)',
    '--config.model.attn_heads=1', '--config.model.attn_dim_head=8',
    '--config.model.dtype=float32', '--config.diffusion.timesteps=20',
    f'--config.train.batch_size={BATCH}', f'--config.train.num_epochs={EPOCHS}',
    '--config.optim.learning_rate=1e-3', '--config.optim.warmup_steps=2',
    # Adam's step lr * g / (|g| + eps) turns rounding-level differences of tiny
    # gradients (device reduction order) into +-lr jumps; a large eps keeps it linear.
    '--config.optim.eps=1e-3',
    '--config.train.checkpoint_every_steps=2', '--config.train.keep_checkpoints=20',
    '--config.train.num_grid_samples=4', '--config.train.grid_sampler=ddim',
    '--config.train.grid_ddim_steps=3', '--config.train.progress_bar=False',
]


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return cli_helpers.subprocess_env(tmp_path_factory.mktemp('jax_cache'))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, env):
  return cli_helpers.build_synthetic_dataset(tmp_path_factory.mktemp('sen12ms'), env,
                                             NUM_PATCHES)


def _command(workdir, data_dir, *extra, mode='train'):
  return [sys.executable, '-m', 'eo_ddpm_jax.main', '--config=configs/demo.py',
          f'--workdir={workdir}', f'--mode={mode}', f'--config.data.data_dir={data_dir}',
          *TINY, *extra]


def _train(workdir, data_dir, env, *extra, devices=1, check=True):
  run_env = {**env, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  result = subprocess.run(_command(workdir, data_dir, *extra), cwd=ROOT, env=run_env,
                          capture_output=True, text=True)
  if check and result.returncode != 0:
    raise AssertionError(f'training failed:\n{result.stderr[-5000:]}')
  return result


def _final_state(workdir, step=FINAL_STEP):
  """The saved TrainState tree (nested dicts of arrays), read onto one CPU device."""
  import jax  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  checkpointer = ocp.StandardCheckpointer()
  try:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    # A target with this process's sharding, also for checkpoints written on 4 devices.
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata.tree)
    return checkpointer.restore(path, target)
  finally:
    # Closed, or its background threads outlive the test (an unraisable-exception
    # warning at garbage collection).
    checkpointer.close()


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f)}


def _grids(workdir):
  """int [EPOCHS, H, W, 3]: the per-epoch sample grids as saved (uint8 PNG values)."""
  return np.stack([np.asarray(Image.open(os.path.join(workdir, 'samples',
                                                      f'epoch_{epoch:03d}.png')), int)
                   for epoch in range(1, EPOCHS + 1)])


def _assert_same_grids(workdir, reference):
  # The grid is sampled on all devices (batch padded to a multiple of their count) from
  # per-image keys, so it is the 1-device grid up to the params' float differences:
  # at most one 8-bit level after rounding, 2 allowed.
  difference = np.abs(_grids(workdir) - _grids(reference))
  assert difference.max() <= 2, difference.max()


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, data_dir, env):
  """An uninterrupted 1-device run."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  _train(workdir, data_dir, env)
  return workdir


def test_run_leaves_checkpoints_logs_and_grids(reference_run):
  losses = _losses(reference_run)
  assert sorted(losses) == list(range(1, FINAL_STEP + 1))
  assert all(np.isfinite(list(losses.values())))
  steps = sorted(int(s) for s in os.listdir(os.path.join(reference_run, 'checkpoints')))
  assert steps == list(range(2, FINAL_STEP + 1, 2))  # checkpoint_every_steps=2.
  for epoch in range(1, EPOCHS + 1):
    grid = np.asarray(Image.open(os.path.join(reference_run, 'samples',
                                              f'epoch_{epoch:03d}.png')))
    assert grid.shape == (32, 32, 3)  # 4 samples of 16x16 as 2x2.
  assert os.listdir(os.path.join(reference_run, 'tensorboard'))
  state = _final_state(reference_run)
  assert int(state['step']) == FINAL_STEP


def test_four_devices_match_one_device(tmp_path, reference_run, data_dir, env):
  workdir = str(tmp_path / 'four')
  result = _train(workdir, data_dir, env, devices=4)
  assert result.stderr.count('CpuDevice(id=') >= 4  # main logs jax.devices().
  ref, four = _losses(reference_run), _losses(workdir)
  assert sorted(four) == sorted(ref)
  # Same global batch, seed and noise; only the reduction order differs.
  np.testing.assert_allclose([four[s] for s in sorted(four)], [ref[s] for s in sorted(ref)],
                             rtol=1e-4)
  for got, want in zip(_leaves(_final_state(workdir)['params']),
                       _leaves(_final_state(reference_run)['params'])):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  _assert_same_grids(workdir, reference_run)


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory, data_dir, env):
  """The reference run's training in two processes writing into one workdir."""
  workdir = str(tmp_path_factory.mktemp('two_hosts'))
  cli_helpers.run_two_hosts(_command(workdir, data_dir), env)
  return workdir


def test_two_processes_match_one_process(two_process_run, reference_run):
  """Two processes train like one.

  Each process reads its own half of every global batch; the step all-reduces over 4
  devices in 2 processes; both write into one workdir (a shared filesystem).
  """
  workdir = two_process_run
  ref, two = _losses(reference_run), _losses(workdir)
  assert sorted(two) == sorted(ref)  # Logged once, by the first process.
  np.testing.assert_allclose([two[s] for s in sorted(two)], [ref[s] for s in sorted(ref)],
                             rtol=1e-4)
  for got, want in zip(_leaves(_final_state(workdir)['params']),
                       _leaves(_final_state(reference_run)['params'])):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  _assert_same_grids(workdir, reference_run)
  # The data position of each process is in the checkpoint.
  data_dir_files = os.listdir(os.path.join(workdir, 'checkpoints', str(FINAL_STEP), 'data'))
  assert sorted(f for f in data_dir_files if f.endswith('.json')) == [
      'process_0-of-2.json', 'process_1-of-2.json']


def test_sample_mode_in_two_processes_matches_one_process(two_process_run, reference_run,
                                                          data_dir, env):
  """--mode=sample on 2 hosts: each restores the checkpoint, the images are gathered.

  Image i comes from its own key on whichever device draws it, so the 2-process images
  equal the 1-process images of the reference run up to the params' float differences.
  """
  flags = ['--config.sample.num_samples=5', '--config.sample.batch_size=2',
           '--config.sample.sampler=ddim', '--config.sample.ddim_steps=3']
  cli_helpers.run_two_hosts(_command(two_process_run, data_dir, *flags, mode='sample'), env)
  result = subprocess.run(_command(reference_run, data_dir, *flags, mode='sample'),
                          cwd=ROOT, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  name = os.path.join('samples', f'step_{FINAL_STEP}_ddim3.npy')
  two = np.load(os.path.join(two_process_run, name))
  one = np.load(os.path.join(reference_run, name))
  assert two.shape == one.shape == (5, 16, 16, 3)
  np.testing.assert_allclose(two, one, atol=1e-3)
  assert np.abs(one[1:] - one[:1]).max() > 0.1  # Distinct images, not one repeated.


def test_sigkill_and_resume_equals_uninterrupted(tmp_path, reference_run, data_dir, env):
  workdir = str(tmp_path / 'killed')
  run_env = {**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  process = subprocess.Popen(_command(workdir, data_dir), cwd=ROOT, env=run_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = os.path.join(workdir, 'checkpoints', '2')
  while not os.path.exists(first) and process.poll() is None:
    time.sleep(0.005)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL, 'the run ended before it was killed'
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))
                 if s.isdigit())
  assert FINAL_STEP not in saved, f'killed too late: {saved}'
  _train(workdir, data_dir, env)  # Resumes from the newest checkpoint that restores.
  resumed, reference = _final_state(workdir), _final_state(reference_run)
  for name in ('params', 'ema_params', 'opt_state', 'step'):
    for got, want in zip(_leaves(resumed[name]), _leaves(reference[name])):
      np.testing.assert_array_equal(got, want, err_msg=f'{name} differs after resume')
  assert _losses(workdir) == _losses(reference_run)


def test_non_finite_loss_stops_naming_step_and_checkpoint(tmp_path, reference_run,
                                                         data_dir, env):
  workdir = str(tmp_path / 'nan')
  shutil.copytree(reference_run, workdir)
  # One more epoch with a NaN input scale: the first new step's loss is NaN.
  result = _train(workdir, data_dir, env, f'--config.train.num_epochs={EPOCHS + 1}',
                  '--config.diffusion.input_scale=nan', check=False)
  assert result.returncode != 0
  last = os.path.join(workdir, 'checkpoints', str(FINAL_STEP))
  assert (f'Non-finite loss nan at step {FINAL_STEP + 1}' in result.stderr
          and f'last good checkpoint is {last}' in result.stderr), result.stderr[-3000:]
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')))
  assert steps[-1] == FINAL_STEP
  for got, want in zip(_leaves(_final_state(workdir)), _leaves(_final_state(reference_run))):
    np.testing.assert_array_equal(got, want)


def test_resume_with_another_model_names_the_arrays_and_keeps_the_config(
    tmp_path, reference_run, data_dir, env):
  workdir = str(tmp_path / 'other_model')
  shutil.copytree(reference_run, workdir)
  config_path = os.path.join(workdir, 'config.json')
  with open(config_path) as f:
    run_config = f.read()
  result = _train(workdir, data_dir, env, '--config.model.dim=16', check=False)
  assert result.returncode != 0
  # Named from the saved metadata: the first attention's RMSNorm gain has dim entries.
  assert ('Step 8 failed with ValueError: it was saved by another model or optimizer: '
          '628 of 656 arrays differ in shape or dtype, e.g. params/downs_0_attn/norm/g: '
          'saved (8,) float32, this config (16,) float32' in result.stderr
          ), result.stderr[-3000:]
  # No Orbax restore was tried, so none of its failing reads' tracebacks (thousands of
  # lines before) flood the log.
  assert 'Event loop is closed' not in result.stderr
  assert 'orbax/checkpoint/_src/serialization' not in result.stderr
  with open(config_path) as f:
    assert f.read() == run_config  # The run's own settings stay on disk.
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')))
  assert steps[-1] == FINAL_STEP  # No checkpoint moved aside or lost.


def test_sample_mode_writes_grid_and_arrays(reference_run, data_dir, env):
  result = subprocess.run(
      _command(reference_run, data_dir, '--config.sample.num_samples=3',
               '--config.sample.batch_size=2', '--config.sample.sampler=ddim',
               '--config.sample.ddim_steps=3', mode='sample'),
      cwd=ROOT, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  stem = os.path.join(reference_run, 'samples', f'step_{FINAL_STEP}_ddim3')
  images = np.load(stem + '.npy')
  assert images.shape == (3, 16, 16, 3) and images.dtype == np.float32
  assert images.min() >= -1.0 and images.max() <= 1.0
  grid = np.asarray(Image.open(stem + '.png'))
  assert grid.shape == (32, 32, 3)  # ceil(sqrt(3)) = 2 columns, 2 rows.
  expected = np.rint((images + 1) / 2 * 255).astype(np.uint8)
  np.testing.assert_array_equal(grid[:16, :16], expected[0])
  np.testing.assert_array_equal(grid[16:, :16], expected[2])
  assert not grid[16:, 16:].any()  # The missing fourth tile stays black.
