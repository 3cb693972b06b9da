"""Tests of --mode=evaluate (eo_ddpm_jax.evaluate) on a tiny run and a real TFDS build.

The run's checkpoints hold NumPy-drawn U-Net params (EMA params unlike the params, so a
mix-up shows), saved through eo_ddpm_jax.checkpoints as training saves them: compiling a
train step takes minutes on a busy 2-core CPU, and training is tested in test_train_e2e.
Each value in eval.json is recomputed here from the saved samples and real patches.
FID and KID use the FID Inception network with tests/test_inception.py's random weights.
"""

import json
import os
import shutil
import struct
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from configs import demo
from eo_ddpm_jax import checkpoints
from eo_ddpm_jax import eo_metrics
from eo_ddpm_jax import evaluate
from eo_ddpm_jax import fid
from eo_ddpm_jax import inception
from eo_ddpm_jax import input_pipeline
from eo_ddpm_jax import metric_writer
from eo_ddpm_jax import run_config
from eo_ddpm_jax import sampling
from eo_ddpm_jax import train_step as train_step_lib
from tests import cli_helpers
from tests import test_inception
from tests.test_fid import numpy_frechet
from tests.test_sampling import ATOL, random_params

ROOT = cli_helpers.ROOT
NUM_PATCHES, BATCH = 16, 4  # 4 steps per epoch.
SAVED_STEPS = (4, 6, 8)  # Epoch ends 4 and 8, and a step inside epoch 2.
NUM_SAMPLES, NUM_REAL = 5, 10
# Model and evaluation settings; data.data_dir is added per test session.
OVERRIDES = {
    'data.image_size': 16, 'model.dim': 8, 'model.dim_mults': (1,), 'model.attn_heads': 1,
    'model.attn_dim_head': 8, 'model.dtype': 'float32', 'model.attention_impl': 'einsum',
    'diffusion.timesteps': 4, 'train.batch_size': BATCH,
    'eval.num_samples': NUM_SAMPLES, 'eval.batch_size': 2, 'eval.sampler': 'dpm_solver',
    'eval.steps': 3, 'eval.num_real': NUM_REAL, 'eval.inception_batch_size': 4,
    'eval.kid_num_subsets': 10, 'eval.num_grid_samples': 4, 'eval.save_samples': True,
    'eval.progress_bar': False, 'eval.checkpoint_steps': (),  # demo.py names its own.
}


def make_config(data_dir, **extra):
  config = demo.get_config()
  for key, value in {**OVERRIDES, 'data.data_dir': data_dir, **extra}.items():
    group, name = key.split('.')
    config[group][name] = value
  return config


def cli_flags(data_dir, **extra):
  return [f'--config.{key}={value}'.replace(' ', '') for key, value in
          {**OVERRIDES, 'data.data_dir': data_dir, **extra}.items()]


def build_dataset(base, env):
  """A real TFDS build (tfds_sen12ms builder) of NUM_PATCHES synthetic patches."""
  return cli_helpers.build_synthetic_dataset(base, env, NUM_PATCHES)


def ema_params(config, step):
  """The EMA params saved at `step` (seeded by it)."""
  return random_params(train_step_lib.create_model(config.model), config.data.image_size,
                       seed=1000 + step)


def write_run(workdir, config, steps=SAVED_STEPS):
  """Checkpoints as training writes them, with known params; and the run's config.json."""
  model = train_step_lib.create_model(config.model)
  tx = train_step_lib.create_optimizer(config.optim, optax.constant_schedule(0.0))
  manager = checkpoints.create_manager(workdir, config.train, NUM_PATCHES // BATCH)
  for step in steps:
    params = random_params(model, config.data.image_size, seed=step)
    state = train_step_lib.TrainState(
        step=jax.numpy.asarray(step, jax.numpy.int32), params=params,
        ema_params=ema_params(config, step), opt_state=tx.init(params),
        rng=jax.random.PRNGKey(0))
    checkpoints.save(manager, step, state, {})
  manager.close()
  run_config.save_config(config, workdir)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return cli_helpers.subprocess_env(tmp_path_factory.mktemp('jax_cache'))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, env):
  return build_dataset(tmp_path_factory.mktemp('sen12ms'), env)


@pytest.fixture(scope='module')
def inception_weights(tmp_path_factory):
  """tests/test_inception.py's random-weight network as a pytorch-fid state_dict .npz."""
  script = test_inception._reference_script()  # pylint: disable=protected-access
  with np.load(test_inception.REFERENCE, allow_pickle=False) as data:
    state_dict = {key[len('bn/'):]: data[key] for key in data.files if key.startswith('bn/')}
    conv_shapes = json.loads(str(data['conv_shapes']))
  for key, shape in conv_shapes.items():
    state_dict[key] = script.random_conv_weight(key, tuple(shape))
  path = str(tmp_path_factory.mktemp('inception') / 'random_inception.npz')
  np.savez(path, **state_dict)
  return path


@pytest.fixture(scope='module')
def evaluated(tmp_path_factory, data_dir, env, inception_weights):
  """Two evaluations of one run: the CLI without Inception weights (all epochs), then
  in-process with them for step 8 only. Returns what each left behind."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = make_config(data_dir)
  write_run(workdir, config)
  samples_dir = os.path.join(workdir, 'samples')
  result = subprocess.run(
      [sys.executable, '-m', 'eo_ddpm_jax.main', '--config=configs/demo.py',
       f'--workdir={workdir}', '--mode=evaluate', *cli_flags(data_dir),
       # One CPU device, like the in-process rerun below, which must give the same images
       # bit for bit (other device counts agree within float tolerance: test_sampling).
       '--config.train.cpu_devices=1'],
      cwd=ROOT, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-5000:]
  first = {'json': evaluate.read_eval_json(workdir), 'stderr': result.stderr,
           'samples': {s: np.load(os.path.join(samples_dir, f'eval_samples_{s}.npy'))
                       for s in (4, 8)},
           'reals': np.load(os.path.join(samples_dir, 'eval_reals.npy'))}
  with_weights = make_config(data_dir, **{'eval.checkpoint_steps': (8,),
                                          'eval.inception_weights': inception_weights})
  returned = evaluate.evaluate(with_weights, workdir)
  second = {'json': evaluate.read_eval_json(workdir), 'returned': returned,
            'samples': np.load(os.path.join(samples_dir, 'eval_samples_8.npy')),
            'reals': np.load(os.path.join(samples_dir, 'eval_reals.npy'))}
  return {'workdir': workdir, 'config': config, 'first': first, 'second': second}


def test_eval_json_structure_and_skipped_fid(evaluated):
  first = evaluated['first']
  assert list(first['json']) == ['4', '8']  # Epoch ends only: step 6 is not one.
  for step, epoch in ((4, 1), (8, 2)):
    entry = first['json'][str(step)]
    assert entry['step'] == step and entry['epoch'] == epoch
    assert (entry['sampler'], entry['steps'], entry['num_samples'], entry['num_real'],
            entry['seed'], entry['seed_offset']) == ('dpm_solver', 3, NUM_SAMPLES, NUM_REAL,
                                                     0, 2)
    assert entry['grid'] == f'samples/eval_samples_{step}.png'
    assert entry['seconds']['sampling'] > 0 and entry['seconds']['metrics'] > 0
    for name in evaluate.INCEPTION_METRICS:
      assert entry['metrics'][name] is None
    assert entry['inception_weights'] is None
    assert entry['fid_skipped'] == 'eval.inception_weights is empty'
  # Logged: that, why, and how to enable them.
  assert 'FID and KID are skipped: eval.inception_weights is empty' in first['stderr']
  assert inception.FID_WEIGHTS_URL in first['stderr']


def test_reals_are_preprocessed_patches_of_the_split(evaluated, data_dir):
  reals = evaluated['first']['reals']
  assert reals.shape == (NUM_REAL, 16, 16, 3) and reals.dtype == np.float32
  config = evaluated['config']
  source = input_pipeline.make_source(config.data)
  every = np.stack([input_pipeline.preprocess_image(np.asarray(source[i]['image']),
                                                    config.data, flip=False)
                    for i in range(len(source))])
  # Each real is one of the split's patches (unflipped), each a different one.
  matches = [int(np.flatnonzero(np.all(every == real, axis=(1, 2, 3)))[0]) for real in reals]
  assert len(set(matches)) == NUM_REAL


def test_samples_are_the_ema_params_images(evaluated):
  config = evaluated['config']
  model = train_step_lib.create_model(config.model)
  schedule = train_step_lib.create_schedule(config.diffusion)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), config.eval.seed_offset)
  from tests.test_sampling import reference_images  # pylint: disable=g-import-not-at-top
  # test_sampling.reference_images samples with its STEPS (3) = eval.steps here.
  expected = reference_images('dpm_solver', config, model, schedule, ema_params(config, 8),
                              rng, NUM_SAMPLES)
  np.testing.assert_allclose(evaluated['first']['samples'][8], expected, atol=ATOL)
  # The same seed at every step; a rerun gives the same images.
  np.testing.assert_array_equal(evaluated['second']['samples'], evaluated['first']['samples'][8])


def test_eo_statistics_equal_recomputation(evaluated):
  first = evaluated['first']
  for step in (4, 8):
    expected = eo_metrics.eo_statistics(first['samples'][step], first['reals'],
                                        np.random.default_rng(evaluated['config'].seed))
    got = first['json'][str(step)]['metrics']
    assert {k: got[k] for k in expected} == pytest.approx(expected, rel=1e-12)
  # Samples of two different EMA params differ, and so do their statistics.
  assert first['json']['4']['metrics']['w1_R'] != first['json']['8']['metrics']['w1_R']


def test_grid_png_is_the_first_samples(evaluated):
  samples = evaluated['first']['samples'][4]
  grid = np.asarray(Image.open(os.path.join(evaluated['workdir'], 'samples',
                                            'eval_samples_4.png')))
  np.testing.assert_array_equal(grid, sampling.image_grid(samples[:4]))
  assert grid.shape == (32, 32, 3)  # 4 samples of 16x16 as 2x2.


def subspace_frechet(features1, features2):
  """The Fréchet distance in the span of the centred features and the mean difference.

  It does not change under an orthogonal change of basis, and the few features of a test
  span a small subspace of the 2048 dimensions, outside which both covariances and the
  mean difference vanish: so the eigen form (test_fid.numpy_frechet) in that subspace is
  the full value, in milliseconds where a 2048-d eigendecomposition takes 10 s here.
  """
  span = np.concatenate([features1 - features1.mean(0), features2 - features2.mean(0),
                         (features1.mean(0) - features2.mean(0))[None]])
  basis, _ = np.linalg.qr(span.T)  # [2048, K] orthonormal columns.
  return numpy_frechet(*fid.feature_statistics(features1 @ basis),
                       *fid.feature_statistics(features2 @ basis))


def test_fid_and_kid_equal_recomputation(evaluated, inception_weights, data_dir):
  second, config = evaluated['second'], evaluated['config']
  entry = second['json']['8']
  assert entry['inception_weights'] == inception_weights and entry['fid_skipped'] is None
  feature_fn = inception.make_feature_fn(
      inception.load_fid_inception_variables(inception_weights))
  # One call for all images (one compilation), in [0, 1].
  both = np.asarray(feature_fn((np.concatenate([second['samples'], second['reals']]) + 1) / 2),
                    np.float64)
  samples, reals = both[:NUM_SAMPLES], both[NUM_SAMPLES:]
  order = np.random.default_rng(config.seed).permutation(NUM_REAL)
  halves = reals[order[:NUM_REAL // 2]], reals[order[NUM_REAL // 2:]]
  kid = lambda a, b: fid.kernel_inception_distance(a, b, np.random.default_rng(config.seed),
                                                   num_subsets=10)
  expected = {'fid': subspace_frechet(samples, reals), 'fid_floor': subspace_frechet(*halves)}
  expected['kid_mean'], expected['kid_std'] = kid(samples, reals)
  expected['kid_floor_mean'], expected['kid_floor_std'] = kid(*halves)
  got = entry['metrics']
  # Features in batches of 4 (padded) vs all at once: float32 rounding only.
  assert {k: got[k] for k in expected} == pytest.approx(expected, rel=1e-4)
  assert got['fid'] > got['fid_floor'] > 0  # Random U-Net samples are far from real.
  # The real features are cached beside the dataset, keyed by the weights.
  path = fid.real_statistics_path(data_dir, 'train+test', 16, NUM_REAL)
  with np.load(path) as cached:
    assert 'weights=' in str(cached['key'][3])
    np.testing.assert_allclose(cached['features'], reals, rtol=1e-3, atol=1e-4)


def test_reevaluation_replaces_only_its_step(evaluated):
  first, second = evaluated['first']['json'], evaluated['second']['json']
  assert list(second) == ['4', '8']
  assert second['4'] == first['4']  # Untouched: still without FID.
  assert second['8']['metrics']['fid'] is not None and first['8']['metrics']['fid'] is None
  assert second['8']['metrics']['w1_R'] == pytest.approx(first['8']['metrics']['w1_R'],
                                                         rel=1e-12)
  assert evaluated['second']['returned'] == second


def _scalars(logdir):
  """{tag: {step: value}} of every tensorboardX event file under logdir."""
  scalars = {}
  for name in os.listdir(logdir):
    with open(os.path.join(logdir, name), 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):  # TFRecord: length, its crc, payload, payload crc.
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_tensorboard_scalars(evaluated):
  scalars = _scalars(os.path.join(evaluated['workdir'], metric_writer.TENSORBOARD_SUBDIR))
  first, second = evaluated['first']['json'], evaluated['second']['json']
  assert scalars['eval/w1_G'][4] == pytest.approx(first['4']['metrics']['w1_G'], rel=1e-6)
  assert scalars['eval/fid'] == {8: pytest.approx(second['8']['metrics']['fid'], rel=1e-6)}
  assert 'eval/kid_floor_mean' in scalars and 'eval/raps_log10_mad_floor' in scalars


def test_missing_step_and_no_epoch_checkpoint_are_named(tmp_path, data_dir):
  with pytest.raises(FileNotFoundError, match=r'steps \[5\] that are not saved; '
                                              r'available: \[4, 6, 8\]'):
    evaluate.steps_to_evaluate([4, 6, 8], 4, (5,))
  with pytest.raises(FileNotFoundError, match='No epoch-end checkpoint'):
    evaluate.steps_to_evaluate([6], 4, ())
  assert evaluate.steps_to_evaluate([8, 4, 6], 4, ()) == [4, 8]
  assert evaluate.steps_to_evaluate([8, 4, 6], 4, (6, 6)) == [6]
  assert evaluate.epoch_of(6, 4) == 1.5 and evaluate.epoch_of(8, 4) == 2
  config = make_config(data_dir, **{'eval.inception_weights': str(tmp_path / 'none.pth')})
  with pytest.raises(ValueError, match="eval.inception_weights=.*none.pth' is not a file"):
    evaluate.evaluate(config, str(tmp_path))


def test_config_unlike_the_runs_is_named_before_compute(evaluated, data_dir):
  config = make_config(data_dir, **{'diffusion.schedule': 'linear', 'model.dim_mults': (1, 2)})
  with pytest.raises(ValueError, match=r"differs from the one .* was trained with .*"
                                       r"model.dim_mults: \[1\] in the run vs \(1, 2\); "
                                       r"diffusion.schedule: 'sigmoid' in the run vs 'linear'"):
    evaluate.evaluate(config, evaluated['workdir'])
  # The arithmetic may differ (e.g. bfloat16 training, float32 evaluation).
  config = make_config(data_dir, **{'model.dtype': 'bfloat16'})
  assert run_config.checkpoint_mismatches(
      run_config.load_config(evaluated['workdir']), config) == []


def test_two_processes_evaluate_like_one(tmp_path, data_dir, env, inception_weights,
                                         evaluated):
  """--mode=evaluate on 2 hosts of 2 devices each, with FID, on a copy of the dataset
  whose real-feature cache is empty: both hosts miss it together and each writes it.

  The samples are gathered onto every host and only the first one writes; the images
  equal the 1-process ones up to the params' float differences, and so do the metrics.
  """
  data_copy = str(tmp_path / 'sen12ms' / 'tfds')
  shutil.copytree(data_dir, data_copy)
  workdir = str(tmp_path / 'run')
  write_run(workdir, make_config(data_copy), steps=(8,))
  cli_helpers.run_two_hosts(
      [sys.executable, '-m', 'eo_ddpm_jax.main', '--config=configs/demo.py',
       f'--workdir={workdir}', '--mode=evaluate',
       *cli_flags(data_copy, **{'eval.checkpoint_steps': (8,),
                                'eval.inception_weights': inception_weights})], env)
  one = evaluated['second']
  entries = evaluate.read_eval_json(workdir)
  assert list(entries) == ['8'] and entries['8']['num_devices'] == 4
  samples = np.load(os.path.join(workdir, 'samples', 'eval_samples_8.npy'))
  np.testing.assert_allclose(samples, one['samples'], atol=1e-3)
  np.testing.assert_array_equal(
      np.load(os.path.join(workdir, 'samples', 'eval_reals.npy')), one['reals'])
  got, want = entries['8']['metrics'], one['json']['8']['metrics']
  assert got.keys() == want.keys()
  assert got == pytest.approx(want, rel=1e-3, abs=1e-6)
  # One cache file beside the copy, no temporary file left.
  assert sorted(os.listdir(tmp_path / 'sen12ms')) == sorted([
      'tfds', os.path.basename(fid.real_statistics_path(data_copy, 'train+test', 16,
                                                        NUM_REAL))])
