"""The training loop: data, state, the compiled step, logging, checkpoints, sample grids.

`train_and_evaluate(config, workdir)` is one linear function in phases. It resumes
from the newest checkpoint in `workdir` that restores (train state and data iterator
position), so a run killed at any moment and restarted ends with the parameters of a
run that was never interrupted.
"""

import functools
import os
import time

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from eo_ddpm_jax import checkpoints
from eo_ddpm_jax import config_check
from eo_ddpm_jax import input_pipeline
from eo_ddpm_jax import metric_writer
from eo_ddpm_jax import run_config
from eo_ddpm_jax import sampling
from eo_ddpm_jax import train_step as train_step_lib

SAMPLES_SUBDIR = 'samples'


def _to_floats(metrics: dict[str, jax.Array]) -> dict[str, float]:
  return {name: float(value) for name, value in jax.device_get(metrics).items()}


def initialize_distributed(train_config: ml_collections.ConfigDict) -> None:
  """jax.distributed.initialize with the coordinator, process count and id of the config
  where set (else the cluster's own detection). Must run before anything touches the
  devices; a second call does nothing.

  CPU processes exchange data through gloo: XLA's CPU client has no collectives between
  processes otherwise (GPUs and TPUs use their own).
  """
  if jax.distributed.is_initialized():
    return  # main.py initialises before it touches the devices; a library call here.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {}
  if train_config.coordinator_address:
    kwargs['coordinator_address'] = train_config.coordinator_address
  if train_config.num_processes > 0:
    kwargs['num_processes'] = train_config.num_processes
  if train_config.process_id >= 0:
    kwargs['process_id'] = train_config.process_id
  jax.distributed.initialize(**kwargs)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> train_step_lib.TrainState:
  """Trains `config` in `workdir` (resuming if it holds checkpoints).

  Writes `<workdir>/config.json`, `checkpoints/<step>`, `tensorboard/`, `metrics.jsonl`
  (one line per logged step: loss, grad_norm, learning_rate, images_per_sec) and, after
  every epoch, `samples/epoch_<NNN>.png`, a grid of `train.num_grid_samples` EMA samples.

  Returns:
    The final TrainState.
  Raises:
    config_check.ConfigError: a bad config, before any compute.
    FileNotFoundError: the dataset is not built.
    FloatingPointError: a non-finite loss; names the step and the last good checkpoint.
    OSError: unwritable workdir or full disk, said plainly.
  """
  t = config.train
  # --- Hosts and devices; config checks before anything is computed.
  if t.distributed:
    initialize_distributed(t)
  config_check.check_config(config, num_devices=jax.device_count(),
                            num_processes=jax.process_count())
  checkpoints.ensure_writable(workdir)

  # --- Data source and the length of the run.
  source = input_pipeline.make_source(config.data)
  steps_per_epoch = input_pipeline.steps_per_epoch(len(source), t.batch_size)
  if steps_per_epoch == 0:
    raise config_check.ConfigError(
        f'train.batch_size={t.batch_size} exceeds the {len(source)} examples of '
        f'data.split={config.data.split!r}; lower it.')
  total_steps = steps_per_epoch * t.num_epochs
  if t.max_steps > 0:
    total_steps = min(total_steps, t.max_steps)

  # --- Model, optimizer, schedule, mesh.
  mesh = train_step_lib.make_mesh()
  model = train_step_lib.create_model(config.model)
  learning_rate_fn = train_step_lib.create_learning_rate_fn(config.optim, total_steps)
  tx = train_step_lib.create_optimizer(config.optim, learning_rate_fn)
  schedule = train_step_lib.create_schedule(config.diffusion)
  image_shape = (config.data.image_size, config.data.image_size, config.model.channels)

  # --- Train state: shapes first, then restore the newest checkpoint or initialize.
  init = functools.partial(train_step_lib.create_train_state, config, model, tx,
                           image_shape=image_shape)
  rng = jax.random.PRNGKey(config.seed)
  abstract_state = jax.eval_shape(init, rng)
  state_sharding = train_step_lib.replicated_sharding(mesh, abstract_state)
  manager = checkpoints.create_manager(workdir, t, steps_per_epoch)
  restored = checkpoints.restore_latest(
      manager, checkpoints.abstract_with_sharding(abstract_state, state_sharding))
  if restored is None:
    state = jax.jit(init, out_shardings=state_sharding)(rng)
    data_state, start_step = None, 0
  else:
    state, data_state, start_step = restored
    logging.info('Resuming from step %d (%s).', start_step, checkpoints.latest_path(manager))
    if data_state is None:  # An imported checkpoint (torch_import) has no data position.
      logging.info('The checkpoint holds no data iterator state: data order starts afresh.')
    if start_step >= total_steps:
      logging.warning('Nothing to train: the checkpoint is at step %d, the run ends at %d. '
                      'Raise train.num_epochs or train.max_steps.', start_step, total_steps)
  # For --mode=report, evaluate and sample. Written once the state restored or was
  # made: a config whose model does not fit the checkpoints leaves the run's own.
  if jax.process_index() == 0:
    run_config.save_config(config, workdir)

  # --- Input iterator, positioned after the last batch the restored state saw.
  dataset = input_pipeline.create_train_dataset(
      source, config.data, global_batch_size=t.batch_size, seed=config.seed,
      num_epochs=t.num_epochs)
  host_iterator = iter(dataset)
  if data_state is not None:
    host_iterator.set_state(data_state)
  batch_sharding = train_step_lib.batch_sharding(mesh)
  batches = input_pipeline.device_prefetch(host_iterator, batch_sharding['image'],
                                           config.data.prefetch)

  # --- Compiled step and sampler.
  step_fn = train_step_lib.make_train_step(config, model, tx, schedule, learning_rate_fn)
  p_train_step = train_step_lib.compile_train_step(step_fn, mesh, state_sharding,
                                                   batch_sharding)
  # The grid is sharded over the devices like the batch (on a 2-core CPU: 4.3 s instead of
  # 9.2 s per 32x32 demo grid); the padding images are dropped.
  grid_batch = sampling.sharded_batch_size(t.num_grid_samples, mesh.size)
  grid_fn = sampling.make_sample_fn(
      config, model, schedule, sampler=t.grid_sampler, batch_size=grid_batch,
      num_steps=t.grid_ddim_steps, eta=config.sample.ddim_eta,
      clip_denoised=t.grid_clip_denoised, mesh=mesh)
  grid_rng = jax.random.fold_in(rng, config.sample.seed_offset)

  # --- Logging.
  writer = metric_writer.MetricWriter(workdir, resume_step=start_step)
  is_first_host = jax.process_index() == 0
  progress = tqdm.tqdm(total=total_steps, initial=start_step, unit='step',
                       disable=not (t.progress_bar and is_first_host))
  pending = []  # (step, metrics on device): read one step late so dispatch runs ahead.
  last_log = (start_step, time.perf_counter())

  def log_pending():
    nonlocal last_log
    for logged_step, device_metrics in pending:
      scalars = _to_floats(device_metrics)
      if not np.isfinite(scalars['loss']):
        last_good = checkpoints.latest_path(manager)
        raise FloatingPointError(
            f'Non-finite loss {scalars["loss"]} at step {logged_step}. Stopped without '
            f'saving; the last good checkpoint is {last_good or "none (none was saved)"}.')
      now = time.perf_counter()
      done_steps, since = logged_step - last_log[0], now - last_log[1]
      scalars['images_per_sec'] = done_steps * t.batch_size / max(since, 1e-9)
      last_log = (logged_step, now)
      writer.write_scalars(logged_step, scalars)
      progress.set_postfix(loss=f'{scalars["loss"]:.4f}',
                           img_s=f'{scalars["images_per_sec"]:.1f}')
    pending.clear()

  # --- Loop: step, log, then checkpoint and sample at epoch ends.
  try:
    for step in range(start_step, total_steps):
      batch = next(batches)
      state, metrics = p_train_step(state, batch)
      log_pending()  # The previous step's metrics; this step is still running.
      new_step = step + 1
      progress.update(1)
      if new_step % t.log_every_steps == 0 or new_step == total_steps:
        pending.append((new_step, metrics))
      end_of_epoch = new_step % steps_per_epoch == 0
      if end_of_epoch or new_step % t.checkpoint_every_steps == 0 or new_step == total_steps:
        log_pending()  # A non-finite loss must stop before it is saved.
        path = checkpoints.save(manager, new_step, state, batches.get_state())
        logging.info('Saved checkpoint %s.', path)
      if end_of_epoch:
        epoch = new_step // steps_per_epoch
        images = sampling.generate(grid_fn, state.ema_params, grid_rng,
                                   t.num_grid_samples, grid_batch)
        grid = sampling.image_grid(images)
        if is_first_host:
          sampling.save_png(os.path.join(workdir, SAMPLES_SUBDIR, f'epoch_{epoch:03d}.png'),
                            grid)
        writer.write_image(new_step, 'ema_samples', grid)
        writer.flush()
    log_pending()
  finally:
    progress.close()
    batches.close()
    writer.close()
    manager.close()
  return state
