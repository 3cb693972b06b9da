"""Command line: `python -m eo_ddpm_jax.main --config=configs/demo.py --workdir=DIR`.

Modes: train (resumes from DIR's checkpoints), sample (EMA params of a checkpoint ->
PNG grid + .npy), evaluate (metrics of DIR's checkpoints -> DIR/eval.json), report
(`--report_workdirs=runs/linear,runs/cosine,runs/sigmoid`: figures, report.md and
report.html in DIR) and import_torch (`--torch_checkpoint=model-10.pt`: a
denoising-diffusion-pytorch 1.x checkpoint -> DIR/config.py + a checkpoint; --config is
optional there, the base for what the file does not hold). Override any config field,
e.g. `--config.train.batch_size=16`.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from eo_ddpm_jax import cpu_devices
from eo_ddpm_jax import evaluate
from eo_ddpm_jax import host_memory
from eo_ddpm_jax import report
from eo_ddpm_jax import sampling
from eo_ddpm_jax import torch_import
from eo_ddpm_jax import train

_MODES = ('train', 'sample', 'evaluate', 'report', 'import_torch')

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/demo.py.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, logs, samples.')
flags.DEFINE_enum('mode', 'train', _MODES, 'What to do.')
flags.DEFINE_list('report_workdirs', [], 'Runs to compare (--mode=report; --workdir is '
                  'the report folder).')
flags.DEFINE_string('torch_checkpoint', None, 'denoising-diffusion-pytorch checkpoint '
                    '(--mode=import_torch), e.g. results/model-10.pt.')
flags.DEFINE_integer('torch_image_size', None, 'Its training image size (--mode='
                     'import_torch; not stored in weights); default data.image_size, 128.')
flags.mark_flags_as_required(['workdir'])  # --config too, except for import_torch.


def run_train(config, workdir: str) -> None:
  train.train_and_evaluate(config, workdir)


def run_sample(config, workdir: str) -> None:
  paths = sampling.sample_from_checkpoint(config, workdir)
  logging.info('Wrote %s and %s.', paths['png'], paths['npy'])
  print(f'Wrote {paths["png"]} and {paths["npy"]}')


def run_evaluate(config, workdir: str) -> None:
  entries = evaluate.evaluate(config, workdir)
  print(f'Wrote {workdir}/{evaluate.EVAL_FILE} ({len(entries)} checkpoints)')


def run_report(config, workdir: str) -> None:
  paths = report.make_report(config, FLAGS.report_workdirs, workdir)
  print(f'Wrote {paths["md"]} and {paths["html"]}')


def run_import_torch(config, workdir: str) -> None:
  if not FLAGS.torch_checkpoint:
    raise app.UsageError('--mode=import_torch needs --torch_checkpoint=<model-N.pt>.')
  result = torch_import.import_trainer_checkpoint(
      FLAGS.torch_checkpoint, workdir, base_config=config,
      image_size=FLAGS.torch_image_size)
  print(f'Imported step {result.step} into {result.checkpoint_path}; use '
        f'--config={result.config_path}')


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.config is None and FLAGS.mode != 'import_torch':
    raise app.UsageError(f'--config is required for --mode={FLAGS.mode}, e.g. --config='
                         'configs/demo.py (an imported run: --config=<workdir>/config.py).')
  # All before anything touches a device.
  if FLAGS.config is not None:
    if FLAGS.config.train.get('cpu_keep_freed_memory', False):
      host_memory.keep_freed_memory()
    cpu_devices.configure(FLAGS.config.train)
    if FLAGS.config.train.distributed:
      train.initialize_distributed(FLAGS.config.train)
  logging.info('JAX devices: %s', jax.devices())
  modes = {'train': run_train, 'sample': run_sample, 'evaluate': run_evaluate,
           'report': run_report, 'import_torch': run_import_torch}
  modes[FLAGS.mode](FLAGS.config, FLAGS.workdir)


def run() -> None:
  """Console-script entry point (`eo-ddpm-jax --config=... --workdir=...`)."""
  app.run(main)


if __name__ == '__main__':
  run()
