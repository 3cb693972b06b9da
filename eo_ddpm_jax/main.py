"""Command line: `python -m eo_ddpm_jax.main --config=configs/demo.py --workdir=DIR`.

Modes: train (resumes from DIR's checkpoints) and sample (EMA params of a checkpoint
-> PNG grid + .npy). Override any config field, e.g. `--config.train.batch_size=16`.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from eo_ddpm_jax import sampling
from eo_ddpm_jax import train

_MODES = ('train', 'sample', 'evaluate', 'report')
_NOT_YET = ('evaluate', 'report')

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/demo.py.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, logs, samples.')
flags.DEFINE_enum('mode', 'train', _MODES, 'What to do.')
flags.mark_flags_as_required(['config', 'workdir'])


def run_train(config, workdir: str) -> None:
  train.train_and_evaluate(config, workdir)


def run_sample(config, workdir: str) -> None:
  paths = sampling.sample_from_checkpoint(config, workdir)
  logging.info('Wrote %s and %s.', paths['png'], paths['npy'])
  print(f'Wrote {paths["png"]} and {paths["npy"]}')


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.mode in _NOT_YET:
    raise app.UsageError(
        f'--mode={FLAGS.mode} is not implemented yet; available: train, sample.')
  logging.info('JAX devices: %s', jax.devices())
  {'train': run_train, 'sample': run_sample}[FLAGS.mode](FLAGS.config, FLAGS.workdir)


def run() -> None:
  """Console-script entry point (`eo-ddpm-jax --config=... --workdir=...`)."""
  app.run(main)


if __name__ == '__main__':
  run()
