"""What a training epoch's end costs: the sample grid and the checkpoint.

After every epoch `train.py` samples a grid of `train.num_grid_samples` EMA images and
saves an Orbax checkpoint. On a small CPU run (configs/demo.py) these took about a third
of the wall time, so this times each the way `train.py` does it now beside the way it
did before, on the same state:
  - grid: sharded over the mesh (batch padded to a multiple of the device count) vs a
    plain `jax.jit` on one device;
  - checkpoint: `checkpoints.save` (host arrays) vs the same Orbax save of the device
    arrays.

  python -m bench.epoch_end                  # configs/demo.py on this machine
  python -m bench.epoch_end --image_size 64 --repeats 3
"""

# pylint: disable=g-import-not-at-top,g-bad-import-order
from bench import common  # First: sets the environment jax reads at import.

import argparse
import functools
import shutil
import sys
import tempfile
import time

import jax
import orbax.checkpoint as ocp

from configs import demo
from eo_ddpm_jax import checkpoints
from eo_ddpm_jax import cpu_devices
from eo_ddpm_jax import sampling
from eo_ddpm_jax import train_step as train_lib


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--image_size', type=int, default=None,
                      help='Override data.image_size of configs/demo.py.')
  parser.add_argument('--repeats', type=int, default=3, help='Timed runs of each.')
  common.add_report_flags(parser)
  return parser.parse_args(argv)


def time_runs(run, repeats: int) -> common.Timing:
  """One untimed run (compilation, first write), then `repeats` timed ones."""
  run()
  return common.time_blocks(run, repeats, 1)


def main(argv):
  args = parse_args(argv)
  config = demo.get_config()
  if args.image_size:
    config.data.image_size = args.image_size
  cpu_devices.configure(config.train)  # Before JAX starts its backend.
  t = config.train
  size = config.data.image_size

  model = train_lib.create_model(config.model)
  learning_rate_fn = train_lib.create_learning_rate_fn(config.optim, 1000)
  tx = train_lib.create_optimizer(config.optim, learning_rate_fn)
  schedule = train_lib.create_schedule(config.diffusion)
  mesh = train_lib.make_mesh(jax.devices())
  init = functools.partial(train_lib.create_train_state, config, model, tx,
                           image_shape=(size, size, config.model.channels))
  rng = jax.random.PRNGKey(config.seed)
  state_sharding = train_lib.replicated_sharding(mesh, jax.eval_shape(init, rng))
  state = jax.jit(init, out_shardings=state_sharding)(rng)
  num_leaves = len(jax.tree.leaves(state))

  def grid(sample_mesh):
    batch = sampling.sharded_batch_size(t.num_grid_samples, sample_mesh.size if sample_mesh
                                        else 1)
    sample_fn = sampling.make_sample_fn(
        config, model, schedule, sampler=t.grid_sampler, batch_size=batch,
        num_steps=t.grid_ddim_steps, eta=config.sample.ddim_eta,
        clip_denoised=t.grid_clip_denoised, mesh=sample_mesh)
    return lambda: sampling.generate(sample_fn, state.ema_params, rng,
                                     t.num_grid_samples, batch)

  workdir = tempfile.mkdtemp(prefix='epoch_end_')
  manager = checkpoints.create_manager(workdir, t, steps_per_epoch=1)
  saved = {'step': 0}

  def save_project():
    saved['step'] += 1
    checkpoints.save(manager, saved['step'], state, {})

  def save_device_arrays():
    path = f'{workdir}/device_arrays'
    shutil.rmtree(path, ignore_errors=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, state)
    checkpointer.wait_until_finished()
    checkpointer.close()  # Its background threads would outlive the call.

  runs = [
      ('grid, sharded over the mesh (train.py)', grid(mesh)),
      ('grid, plain jit on one device (before)', grid(None)),
      ('checkpoint, checkpoints.save: host arrays (train.py)', save_project),
      ('checkpoint, Orbax save of the device arrays (before)', save_device_arrays),
  ]
  rows = []
  for name, run in runs:
    timing = time_runs(run, args.repeats)
    rows.append([name, f'{timing.median:.2f} s', timing.spread])
    print(common.markdown_table(['what', 'median', 'spread'], rows[-1:]), flush=True)
  manager.close()
  shutil.rmtree(workdir, ignore_errors=True)

  notes = [
      f'configs/demo.py at {size}x{size}: U-Net dim={config.model.dim}, '
      f'dim_mults={tuple(config.model.dim_mults)}; {jax.device_count()} '
      f'{jax.devices()[0].platform} device(s).',
      f'Grid: {t.num_grid_samples} EMA samples, {t.grid_sampler} {t.grid_ddim_steps} steps, '
      'random (untrained) weights; the sharded one samples '
      f'{sampling.sharded_batch_size(t.num_grid_samples, mesh.size)} and drops the padding.',
      f'Checkpoint: the train state ({num_leaves} arrays, replicated) plus the data state '
      'for checkpoints.save; synchronous saves into a fresh temporary folder.',
      f'Timing: one untimed run of each, then {args.repeats} timed runs.',
  ]
  if args.note:
    notes.append(args.note)
  common.report(f'Epoch-end costs, {jax.devices()[0].device_kind}',
                common.markdown_table(['what', 'median', 'spread'], rows), notes,
                args.results)


if __name__ == '__main__':
  main(sys.argv[1:])
