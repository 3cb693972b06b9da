"""Command that builds the `sen12ms` TFDS dataset without TensorFlow (`tfds build`
needs it): reads patches in worker processes, shows a progress bar, writes array_record.

  python -m tfds_sen12ms.build --manual_dir=DIR --data_dir=DIR [--config=summer_rgb] \
      [--num_workers=N] [--skip_corrupt]

Exit status 1 with a message naming the file and the fix on bad input; no dataset
version folder is left behind then.
"""

import argparse
import sys

import tensorflow_datasets as tfds

from tfds_sen12ms import layout
from tfds_sen12ms import reader
from tfds_sen12ms import sen12ms


def build(manual_dir, data_dir, config=sen12ms.Sen12ms.DEFAULT_BUILDER_CONFIG_NAME, *,
          num_workers=None, skip_corrupt=False, progress=True):
  """Builds sen12ms/<config> into data_dir from manual_dir.

  Args:
    manual_dir: folder with the season's tree or archive (MANUAL_DOWNLOAD_INSTRUCTIONS).
    data_dir: TFDS data dir; the dataset lands in <data_dir>/sen12ms/<config>/<version>.
    config: a Sen12ms BuilderConfig name, e.g. 'summer_rgb' or 'summer_all'.
    num_workers: reader processes (default: the CPUs available).
    skip_corrupt: leave bad patches out and list them in skipped_files.txt.
    progress: show a progress bar.

  Returns:
    The builder (its info has the split sizes; .skipped lists what was left out).

  Raises:
    Sen12msError: on bad input (the message names the file and the fix).
  """
  builder = sen12ms.Sen12ms(
      data_dir=data_dir, config=config, skip_corrupt=skip_corrupt, progress=progress,
      num_workers=reader.default_num_workers() if num_workers is None else num_workers)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--manual_dir', required=True)
  parser.add_argument('--data_dir', required=True)
  parser.add_argument('--config', default=sen12ms.Sen12ms.DEFAULT_BUILDER_CONFIG_NAME,
                      choices=[c.name for c in sen12ms.Sen12ms.BUILDER_CONFIGS])
  parser.add_argument('--num_workers', type=int, default=None)
  parser.add_argument('--skip_corrupt', action='store_true',
                      help=f'skip bad patches, listing them in {sen12ms.SKIPPED_FILES_NAME}')
  args = parser.parse_args(argv)
  try:
    builder = build(args.manual_dir, args.data_dir, args.config,
                    num_workers=args.num_workers, skip_corrupt=args.skip_corrupt)
  except layout.Sen12msError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
  print(f'Built {builder.info.full_name} in {builder.data_dir}: {sizes}')
  if builder.skipped:
    print(f'Skipped {len(builder.skipped)} corrupt patch(es), listed in '
          f'{builder.data_path / sen12ms.SKIPPED_FILES_NAME}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
