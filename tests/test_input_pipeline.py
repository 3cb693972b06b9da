"""Tests of eo_ddpm_jax.input_pipeline: preprocessing values, order, resume, sharding."""

import itertools

from absl import flags
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
from PIL import Image
import pytest

from configs import default
from eo_ddpm_jax import input_pipeline

# In [-1, 1] units: 2/255 there is 1/255 in [0, 1] units.
_TOL = 2.0 / 255.0


@pytest.fixture
def absl_flags_parsed():
  """grain worker processes read absl flags; main.py parses them in app.run."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _data_config(**overrides):
  config = default.get_config().data
  for key, value in overrides.items():
    config[key] = value
  return config


def _reference(image_uint16, size, flip, dn_scale=5000.0, gamma=2.2):
  """The study's steps with PIL's antialiased bilinear resize, in float64."""
  x = np.clip(image_uint16.astype(np.float64) / dn_scale, 0.0, 1.0)
  x = (x ** (1.0 / gamma) * 255.0).astype(np.float32)
  channels = [np.asarray(Image.fromarray(x[..., c], mode='F').resize(
      (size, size), Image.BILINEAR)) for c in range(3)]
  x = np.stack(channels, axis=-1).astype(np.float64)
  if flip:
    x = x[:, ::-1]
  return x / 127.5 - 1.0


def _random_patches(num, size=256, seed=0):
  rng = np.random.default_rng(seed)
  # Smooth fields plus noise, spanning dark, bright and saturated (> 5000) DNs.
  out = []
  for _ in range(num):
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 6000 * (0.5 + 0.5 * np.sin(6 * xx + rng.uniform(0, 6)) * yy)
    noise = rng.integers(0, 3000, (size, size, 3))
    out.append({'image': np.clip(base[..., None] + noise, 0, 65535)
                         .astype(np.uint16)})
  return out


def _id_source(num, side=8):
  """Constant patches whose DN is unique per example: 100 * (id + 1)."""
  assert 100 * num < 5000  # Below dn_scale, so gamma keeps ids apart.
  return [{'image': np.full((side, side, 3), 100 * (i + 1), np.uint16)}
          for i in range(num)]


def _ids(batch, data_config):
  """Recovers example ids from constant preprocessed images."""
  table = input_pipeline.gamma_table(data_config.dn_scale, data_config.gamma)
  values = batch['image'][:, 0, 0, 0]
  candidates = table[100 * (np.arange(49) + 1)] / 127.5 - 1.0
  ids = np.abs(values[:, None] - candidates[None, :]).argmin(axis=1)
  np.testing.assert_allclose(candidates[ids], values, atol=1e-5)
  return ids.tolist()


@pytest.mark.parametrize('size', [128, 100])
def test_preprocess_matches_independent_reference(size):
  config = _data_config(image_size=size)
  for example, flip in zip(_random_patches(3), [False, True, False]):
    got = input_pipeline.preprocess_image(example['image'], config, flip)
    want = _reference(example['image'], size, flip)
    assert got.shape == (size, size, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=_TOL)
    assert got.min() >= -1.0 and got.max() <= 1.0 + 1e-6


def test_saturated_and_black_pixels():
  config = _data_config(image_size=4)
  image = np.zeros((8, 8, 3), np.uint16)
  image[:, :, 0] = 65535  # Far above dn_scale: clipped to 1 -> +1.
  image[:, :, 1] = 5000  # Exactly dn_scale -> +1.
  got = input_pipeline.preprocess_image(image, config, False)
  np.testing.assert_allclose(got[..., 0], 1.0, atol=1e-6)
  np.testing.assert_allclose(got[..., 1], 1.0, atol=1e-6)
  np.testing.assert_allclose(got[..., 2], -1.0, atol=1e-6)
  # DN 1250 = a quarter of dn_scale: 0.25 ** (1 / 2.2) * 2 - 1.
  image[:] = 1250
  got = input_pipeline.preprocess_image(image, config, False)
  np.testing.assert_allclose(got, 0.25 ** (1 / 2.2) * 2 - 1, atol=1e-6)


def test_pipeline_output_matches_reference_with_flips():
  source = _random_patches(12)
  config = _data_config()
  ds = input_pipeline.create_train_dataset(
      source, config, global_batch_size=4, seed=7, num_epochs=1)
  refs = [[_reference(s['image'], 128, flip) for flip in (False, True)]
          for s in source]
  seen, flips = [], []
  for batch in ds:
    assert batch['image'].shape == (4, 128, 128, 3)
    for image in batch['image']:
      errors = [[np.abs(image - r).max() for r in pair] for pair in refs]
      index, flip = np.unravel_index(np.argmin(errors), (len(source), 2))
      assert errors[index][flip] <= _TOL
      seen.append(index)
      flips.append(flip)
  assert sorted(seen) == list(range(12))  # One epoch: each example once.
  assert 0 < sum(flips) < 12  # Both flipped and unflipped examples occur.


def test_no_flip_when_disabled():
  source = _random_patches(4)
  config = _data_config(random_flip=False, image_size=32)
  batch = next(iter(input_pipeline.create_train_dataset(
      source, config, global_batch_size=4, seed=1, num_epochs=1)))
  for image in batch['image']:
    errors = [np.abs(image - _reference(s['image'], 32, False)).max()
              for s in source]
    assert min(errors) <= _TOL


def test_flip_draw_is_deterministic_and_balanced():
  draws = [input_pipeline.flip_draw(3, p) for p in range(2000)]
  assert draws == [input_pipeline.flip_draw(3, p) for p in range(2000)]
  assert 0.45 < np.mean(draws) < 0.55
  assert draws != [input_pipeline.flip_draw(4, p) for p in range(2000)]


def test_resize_taps_rows_sum_to_one_and_halve_exactly():
  indices, weights = input_pipeline.resize_taps(256, 128)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
  # A 2x antialiased triangle filter has taps 1/8, 3/8, 3/8, 1/8 inside.
  np.testing.assert_allclose(weights[5], [1 / 8, 3 / 8, 3 / 8, 1 / 8])
  assert indices[5].tolist() == [9, 10, 11, 12]


def test_epochs_shuffle_differently_and_drop_remainder():
  config = _data_config(image_size=4)
  source = _id_source(37)
  ds = input_pipeline.create_train_dataset(
      source, config, global_batch_size=8, seed=5, num_epochs=3)
  batches = [_ids(b, config) for b in ds]
  steps = input_pipeline.steps_per_epoch(37, 8)
  assert steps == 4 and len(batches) == 3 * steps
  epochs = [sum(batches[e * steps:(e + 1) * steps], []) for e in range(3)]
  for epoch in epochs:
    assert len(set(epoch)) == 32  # Distinct examples; 5 dropped per epoch.
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
  again = [_ids(b, config) for b in input_pipeline.create_train_dataset(
      source, config, global_batch_size=8, seed=5, num_epochs=3)]
  assert again == batches
  other = [_ids(b, config) for b in input_pipeline.create_train_dataset(
      source, config, global_batch_size=8, seed=6, num_epochs=3)]
  assert other != batches


def test_host_shards_are_disjoint_halves_of_the_global_batch():
  config = _data_config(image_size=4)
  source = _id_source(29)
  kwargs = dict(global_batch_size=6, seed=2, num_epochs=2)
  whole = [_ids(b, config) for b in input_pipeline.create_train_dataset(
      source, config, process_index=0, process_count=1, **kwargs)]
  hosts = [[_ids(b, config) for b in input_pipeline.create_train_dataset(
      source, config, process_index=p, process_count=2, **kwargs)]
           for p in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == len(whole) == 2 * (29 // 6)
  for step, global_ids in enumerate(whole):
    first, second = hosts[0][step], hosts[1][step]
    assert len(first) == len(second) == 3
    assert not set(first) & set(second)
    assert first + second == global_ids


def test_bad_arguments_raise():
  config = _data_config(image_size=4)
  with pytest.raises(ValueError, match='divisible'):
    input_pipeline.create_train_dataset(
        _id_source(20), config, global_batch_size=5, seed=0, num_epochs=1,
        process_index=0, process_count=2)
  with pytest.raises(ValueError, match='fewer than one'):
    input_pipeline.create_train_dataset(
        _id_source(3), config, global_batch_size=4, seed=0, num_epochs=1)


@pytest.mark.parametrize('num_workers', [0, 1])
def test_resume_mid_epoch_and_across_epoch_boundary(num_workers,
                                                   absl_flags_parsed):
  del absl_flags_parsed
  config = _data_config(image_size=4, num_workers=num_workers)
  source = _id_source(21)
  make = lambda: input_pipeline.create_train_dataset(  # pylint: disable=g-long-lambda
      source, config, global_batch_size=4, seed=11, num_epochs=None)
  it = iter(make())
  # 5 steps per epoch: save at step 3 (mid epoch), compare 6 more (into epoch 2).
  head = [next(it)['image'] for _ in range(3)]
  state = it.get_state()
  tail = [next(it)['image'] for _ in range(6)]
  resumed = iter(make())
  resumed.set_state(state)
  for want in tail:
    np.testing.assert_array_equal(next(resumed)['image'], want)
  fresh = iter(make())
  for want in head + tail:
    np.testing.assert_array_equal(next(fresh)['image'], want)
  for iterator in (it, resumed, fresh):
    if hasattr(iterator, 'close'):
      iterator.close()


def test_workers_give_the_same_stream_as_the_main_process(absl_flags_parsed):
  del absl_flags_parsed
  source = _id_source(17)
  stream = lambda workers: [b['image'] for b in itertools.islice(  # pylint: disable=g-long-lambda
      input_pipeline.create_train_dataset(
          source, _data_config(image_size=4, num_workers=workers),
          global_batch_size=4, seed=3, num_epochs=2), 8)]
  for a, b in zip(stream(0), stream(2)):
    np.testing.assert_array_equal(a, b)


def _mesh_sharding():
  mesh = Mesh(np.array(jax.devices()), ('data',),
              axis_types=(jax.sharding.AxisType.Auto,))
  return NamedSharding(mesh, P('data'))


def test_device_prefetch_values_sharding_and_exact_resume():
  config = _data_config(image_size=4)
  source = _id_source(30)
  batch_size = 2 * jax.device_count()
  make = lambda: iter(input_pipeline.create_train_dataset(  # pylint: disable=g-long-lambda
      source, config, global_batch_size=batch_size, seed=4, num_epochs=None))
  host = [next(it)['image'] for it in [make()] for _ in range(8)]
  sharding = _mesh_sharding()
  device_it = input_pipeline.device_prefetch(make(), sharding, size=2)
  for want in host[:3]:
    got = next(device_it)['image']
    assert isinstance(got, jax.Array) and got.sharding == sharding
    np.testing.assert_array_equal(np.asarray(got), want)
  # The thread has read ahead; the saved state must still point at batch 3.
  state = device_it.get_state()
  device_it.close()
  grain_it = make()
  grain_it.set_state(state)
  resumed = input_pipeline.device_prefetch(grain_it, sharding, size=2)
  for want in host[3:8]:
    np.testing.assert_array_equal(np.asarray(next(resumed)['image']), want)
  resumed.close()


def test_device_prefetch_ends_and_reraises():
  sharding = _mesh_sharding()
  n = jax.device_count()
  batches = [{'x': np.full((n, 2), i, np.float32)} for i in range(3)]
  got = list(input_pipeline.device_prefetch(iter(batches), sharding, size=1))
  assert [float(b['x'][0, 0]) for b in got] == [0.0, 1.0, 2.0]

  def broken():
    yield batches[0]
    raise OSError('disk gone')
  it = input_pipeline.device_prefetch(broken(), sharding, size=1)
  next(it)
  with pytest.raises(OSError, match='disk gone'):
    next(it)


def test_make_source_missing_dataset_names_data_dir_and_fix(tmp_path):
  config = _data_config(data_dir=str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError) as info:
    input_pipeline.make_source(config)
  message = str(info.value)
  assert str(tmp_path / 'nowhere') in message
  assert 'python -m tfds_sen12ms.build' in message


def test_real_tfds_builder_end_to_end(tmp_path):
  from tfds_sen12ms import build, synthetic  # Part of this repo: never skipped.
  synthetic.write_season(str(tmp_path / 'raw'), 2, 3, seed=0)
  build.build(str(tmp_path / 'raw'), str(tmp_path / 'tfds'), 'summer_rgb',
              num_workers=0, progress=False)
  config = _data_config(data_dir=str(tmp_path / 'tfds'))
  source = input_pipeline.make_source(config)
  assert len(source) == 6
  raw = [np.asarray(source[i]['image']) for i in range(len(source))]
  assert raw[0].dtype == np.uint16 and raw[0].shape == (256, 256, 3)
  batches = list(input_pipeline.create_train_dataset(
      source, config, global_batch_size=3, seed=0, num_epochs=1))
  assert len(batches) == 2
  for image in np.concatenate([b['image'] for b in batches]):
    errors = [np.abs(image - _reference(r, 128, f)).max()
              for r in raw for f in (False, True)]
    assert min(errors) <= _TOL
