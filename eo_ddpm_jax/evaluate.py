"""`--mode=evaluate`: metrics of the EMA samples of a run's checkpoints, into eval.json.

For each chosen checkpoint of `<workdir>` (`eval.checkpoint_steps`; empty: every
epoch-end checkpoint) it generates `eval.num_samples` images with the EMA params
(sharded over all devices, sampling.generate; the same seed at every step, so the grids
of two epochs start from the same noise) and scores them against `eval.num_real` real
patches of the TFDS split `eval.split`, preprocessed as in training but not flipped:
- the EO statistics of eo_metrics (band distributions, means, spreads, power spectra),
  each with its real-vs-real floor;
- FID and KID on the FID Inception network's features when `eval.inception_weights`
  names its weights, with floors from half against half of the real features (the
  same halves as the EO floors); otherwise null, with the reason in `fid_skipped`.
  The Inception batches are split over all devices too, so each host of a multi-host
  run computes only its devices' share.
  The real features are cached beside the dataset (fid.cached_real_features); FID is
  fid.frechet_distance_of_features (pytorch-fid's value to rounding once there are more
  than 2048 images, without its minute-long sqrtm).
Every random choice (real subset, floor halves, KID subsets) comes from
`np.random.default_rng(config.seed)`, a fresh generator for each.

Writes `<workdir>/eval.json` ({step: entry}, merged with the entries already there: a
re-evaluated step replaces its entry), TensorBoard scalars `eval/<metric>` at the
checkpoint's step into `<workdir>/tensorboard`, and `samples/eval_samples_<step>.png`,
a grid of the first `eval.num_grid_samples` samples (plus .npy of all samples and the
reals when `eval.save_samples`).
"""

import hashlib
import json
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorboardX
import tqdm

from eo_ddpm_jax import checkpoints
from eo_ddpm_jax import config_check
from eo_ddpm_jax import eo_metrics
from eo_ddpm_jax import fid
from eo_ddpm_jax import inception
from eo_ddpm_jax import input_pipeline
from eo_ddpm_jax import metric_writer
from eo_ddpm_jax import run_config
from eo_ddpm_jax import sampling
from eo_ddpm_jax import train
from eo_ddpm_jax import train_step as train_step_lib

EVAL_FILE = 'eval.json'
SAMPLES_SUBDIR = train.SAMPLES_SUBDIR  # Next to training's per-epoch grids.
# FID/KID metric names; null in eval.json when no Inception weights are given.
INCEPTION_METRICS = ('fid', 'kid_mean', 'kid_std', 'fid_floor', 'kid_floor_mean',
                     'kid_floor_std')
# Bytes read at a time when hashing the weights file for the real-feature cache key.
_HASH_CHUNK = 1 << 20


def steps_to_evaluate(available: list[int], steps_per_epoch: int,
                      chosen: tuple[int, ...]) -> list[int]:
  """The checkpoint steps to score, ascending.

  Args:
    available: the steps saved under the workdir.
    steps_per_epoch: steps of one training epoch.
    chosen: `eval.checkpoint_steps`; empty: every available multiple of steps_per_epoch.
  Raises:
    FileNotFoundError: a chosen step is not saved, or (empty choice) no epoch-end one is.
  """
  available = sorted(available)
  if chosen:
    missing = sorted(set(chosen) - set(available))
    if missing:
      raise FileNotFoundError(f'eval.checkpoint_steps names steps {missing} that are not '
                              f'saved; available: {available}.')
    return sorted(set(chosen))
  epoch_steps = [s for s in available if s % steps_per_epoch == 0]
  if not epoch_steps:
    example = f'({available[-1]},)' if available else '(1000,)'
    raise FileNotFoundError(f'No epoch-end checkpoint (a multiple of {steps_per_epoch} '
                            f'steps) among the saved steps {available}; name the steps, '
                            f'e.g. --config.eval.checkpoint_steps="{example}".')
  return epoch_steps


def epoch_of(step: int, steps_per_epoch: int) -> int | float:
  """Epochs done at `step`: an int at epoch ends, else a fraction (3 decimals)."""
  epochs = step / steps_per_epoch
  return int(epochs) if step % steps_per_epoch == 0 else round(epochs, 3)


def real_patch_indices(num_examples: int, num_real: int, seed: int) -> np.ndarray:
  """A seeded random subset of min(num_real, num_examples) indices, ascending."""
  order = np.random.default_rng(seed).permutation(num_examples)
  return np.sort(order[:min(num_real, num_examples)])


def load_real_patches(config: ml_collections.ConfigDict, num_real: int,
                      progress: bool = False) -> np.ndarray:
  """A seeded subset of the real patches of `eval.split`, preprocessed, not flipped.

  Returns:
    float32 [M, S, S, 3] in [-1, 1], M = min(num_real, size of the split).
  Raises:
    FileNotFoundError: the dataset is not built (the message gives the command).
  """
  data_config = config.data.copy_and_resolve_references()
  data_config.split = config.eval.split
  source = input_pipeline.make_source(data_config)
  indices = real_patch_indices(len(source), num_real, config.seed)
  show = progress and jax.process_index() == 0
  return np.stack([input_pipeline.preprocess_image(np.asarray(source[int(i)]['image']),
                                                   config.data, flip=False)
                   for i in tqdm.tqdm(indices, desc='real patches', disable=not show)])


def _weights_digest(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(_HASH_CHUNK), b''):
      digest.update(chunk)
  return digest.hexdigest()[:16]


def real_features_tag(config: ml_collections.ConfigDict) -> str:
  """The real features' cache key beyond split, size and count: weights, subset, preprocessing."""
  d = config.data
  return (f'weights={_weights_digest(config.eval.inception_weights)};seed={config.seed};'
          f'dn_scale={d.dn_scale};gamma={d.gamma};dataset={d.dataset}')


def _batches(images: np.ndarray, batch_size: int):
  for start in range(0, images.shape[0], batch_size):
    yield images[start:start + batch_size]


def _real_halves(real_features: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Two disjoint halves of the reals: those eo_metrics.eo_statistics draws with seed."""
  order = np.random.default_rng(seed).permutation(real_features.shape[0])
  half = real_features.shape[0] // 2
  return real_features[order[:half]], real_features[order[half:2 * half]]


def inception_metrics(sample_features: np.ndarray | None, real_features: np.ndarray,
                      config: ml_collections.ConfigDict) -> dict[str, float]:
  """FID and KID of samples vs reals; without samples, the floors (half vs half of reals).

  Args:
    sample_features: [N >= 2, 2048], or None for the floors.
    real_features: [M >= 4, 2048].
  Returns:
    {'fid', 'kid_mean', 'kid_std'}, or with None {'fid_floor', 'kid_floor_mean',
    'kid_floor_std'}.
  """
  e = config.eval
  if sample_features is None:
    first, second, suffix = *_real_halves(real_features, config.seed), '_floor'
  else:
    first, second, suffix = sample_features, real_features, ''
  kid_mean, kid_std = fid.kernel_inception_distance(
      first, second, np.random.default_rng(config.seed), num_subsets=e.kid_num_subsets,
      subset_size=e.kid_subset_size)
  return {f'fid{suffix}': fid.frechet_distance_of_features(first, second),
          f'kid{suffix}_mean': kid_mean, f'kid{suffix}_std': kid_std}


def read_eval_json(workdir: str) -> dict[str, Any]:
  """`<workdir>/eval.json` as {str(step): entry}; {} when there is none."""
  path = os.path.join(workdir, EVAL_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def write_eval_entry(workdir: str, entry: dict[str, Any]) -> dict[str, Any]:
  """Merges one step's entry into eval.json (replacing that step's), atomically.

  Returns:
    The whole file's content, steps ascending.
  """
  entries = read_eval_json(workdir)
  entries[str(entry['step'])] = entry
  entries = dict(sorted(entries.items(), key=lambda item: int(item[0])))
  path = os.path.join(workdir, EVAL_FILE)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(entries, f, indent=2)
  os.replace(tmp, path)
  return entries


def _feature_fn(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Callable | None:
  """The Inception feature function split over `mesh`, or None (logged: why, and how to
  enable it)."""
  if not config.eval.inception_weights:
    logging.warning(
        'FID and KID are skipped: eval.inception_weights is empty, and they need the FID '
        'Inception network\'s weights. Download %s and pass '
        '--config.eval.inception_weights=<path> (a .pth needs torch; or convert it once '
        'to .npz with eo_ddpm_jax.inception.convert_fid_inception_weights). They are '
        'recorded as null.', inception.FID_WEIGHTS_URL)
    return None
  return inception.make_feature_fn(
      inception.load_fid_inception_variables(config.eval.inception_weights), mesh)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Scores the chosen checkpoints of `workdir` (module docstring); returns eval.json.

  Raises:
    config_check.ConfigError: a bad `eval` setting, or a model or diffusion setting
      unlike the run's config.json, before any compute.
    FileNotFoundError: no checkpoints, a chosen step missing, or the dataset not built.
  """
  e = config.eval
  config_check.check_model_and_diffusion(config)
  config_check.check_sampler_steps(config, 'eval')
  config_check.check_eval(config)
  run_config.check_matches_run(config, workdir)
  manager = checkpoints.open_manager(workdir)
  source = input_pipeline.make_source(config.data)
  # Epochs as training counted them (a batch larger than the split: one step each).
  steps_per_epoch = max(
      input_pipeline.steps_per_epoch(len(source), config.train.batch_size), 1)
  steps = steps_to_evaluate(manager.all_steps(), steps_per_epoch, tuple(e.checkpoint_steps))
  is_first_host = jax.process_index() == 0
  samples_dir = os.path.join(workdir, SAMPLES_SUBDIR)

  mesh = train_step_lib.make_mesh()
  # Inception batches split over all devices (and hosts); the padding is dropped.
  feature_batch_size = sampling.sharded_batch_size(e.inception_batch_size, mesh.size)

  # --- The real side, once: patches, and their Inception features (cached on disk).
  reals = load_real_patches(config, e.num_real, progress=e.progress_bar)
  feature_fn = _feature_fn(config, mesh)
  real_features = None
  if feature_fn is not None:
    real_features = fid.cached_real_features(
        config.data.data_dir, e.split, config.data.image_size, reals.shape[0],
        lambda: fid.extract_features(feature_fn, _batches(reals, feature_batch_size),
                                     feature_batch_size),
        tag=real_features_tag(config))
    floors = inception_metrics(None, real_features, config)  # The same for every step.
  if e.save_samples and is_first_host:
    os.makedirs(samples_dir, exist_ok=True)
    np.save(os.path.join(samples_dir, 'eval_reals.npy'), reals)

  # --- The sampler, compiled once for all steps.
  model = train_step_lib.create_model(config.model)
  schedule = train_step_lib.create_schedule(config.diffusion)
  batch_size = sampling.sharded_batch_size(min(e.batch_size, e.num_samples), mesh.size)
  sample_fn = sampling.make_sample_fn(
      config, model, schedule, sampler=e.sampler, batch_size=batch_size,
      num_steps=e.steps, eta=e.ddim_eta, clip_denoised=e.clip_denoised, mesh=mesh)
  abstract_state = sampling.abstract_train_state(config, model, mesh)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), e.seed_offset)
  num_steps = sampling.sampler_steps(e.sampler, e.steps, config.diffusion.timesteps)
  writer = tensorboardX.SummaryWriter(
      os.path.join(workdir, metric_writer.TENSORBOARD_SUBDIR)) if is_first_host else None

  entries = read_eval_json(workdir)
  try:
    for step in steps:
      # --- Samples of this checkpoint's EMA params.
      start = time.perf_counter()
      params, _ = sampling.restore_ema_params(manager, abstract_state, step, workdir)
      logging.info('Evaluating step %d: %d samples with %s (%d steps) on %d devices.',
                   step, e.num_samples, e.sampler, num_steps, mesh.size)
      samples = sampling.generate(sample_fn, params, rng, e.num_samples, batch_size,
                                  progress=e.progress_bar)
      sampling_seconds = time.perf_counter() - start

      # --- Metrics.
      start = time.perf_counter()
      metrics = eo_metrics.eo_statistics(samples, reals, np.random.default_rng(config.seed))
      if feature_fn is None:
        metrics.update({name: None for name in INCEPTION_METRICS})
      else:
        sample_features = fid.extract_features(
            feature_fn, _batches(samples, feature_batch_size), feature_batch_size)
        metrics.update(inception_metrics(sample_features, real_features, config))
        metrics.update(floors)
      metrics_seconds = time.perf_counter() - start

      entry = {
          'step': step, 'epoch': epoch_of(step, steps_per_epoch),
          'sampler': e.sampler, 'steps': num_steps, 'ddim_eta': e.ddim_eta,
          'clip_denoised': e.clip_denoised, 'num_samples': e.num_samples,
          'num_real': int(reals.shape[0]), 'real_split': e.split, 'seed': config.seed,
          'seed_offset': e.seed_offset, 'num_devices': mesh.size,
          'inception_weights': e.inception_weights or None,
          'fid_skipped': None if feature_fn else 'eval.inception_weights is empty',
          'metrics': metrics,
          'seconds': {'sampling': sampling_seconds, 'metrics': metrics_seconds},
          'grid': os.path.join(SAMPLES_SUBDIR, f'eval_samples_{step}.png'),
          'evaluated_at': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
      }
      logging.info('Step %d: %s', step, {k: v for k, v in metrics.items()
                                         if not k.startswith(('sample_', 'real_'))})
      if not is_first_host:
        continue
      # --- Files, written as each step finishes so an interruption keeps the done ones.
      sampling.save_png(os.path.join(workdir, entry['grid']),
                        sampling.image_grid(samples[:e.num_grid_samples]))
      if e.save_samples:
        np.save(os.path.join(samples_dir, f'eval_samples_{step}.npy'), samples)
      entries = write_eval_entry(workdir, entry)
      for name, value in metrics.items():
        if value is not None:
          writer.add_scalar(f'eval/{name}', value, step)
      writer.flush()
  finally:
    if writer is not None:
      writer.close()
    manager.close()
  return entries
