"""Benchmark: patches/s of the sen12ms build (tree and archive) on synthetic data.

  python bench/build_dataset.py [--num_scenes=4] [--patches_per_scene=16] [--workers=0,2]

Prints one table row per (source, config, workers). The first build of a source
warms the file cache; times include TFDS writing (array_record compression, shuffling).
"""

import argparse
import pathlib
import shutil
import tempfile
import time

from tfds_sen12ms import build
from tfds_sen12ms import layout
from tfds_sen12ms import synthetic


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--num_scenes', type=int, default=4)
  parser.add_argument('--patches_per_scene', type=int, default=16)
  parser.add_argument('--workers', default='0,2')
  parser.add_argument('--configs', default='summer_rgb,summer_all')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    synthetic.write_season(tmp / 'tree', args.num_scenes, args.patches_per_scene)
    (tmp / 'archive').mkdir()
    synthetic.pack_archive(tmp / 'tree', layout.SUMMER,
                           tmp / 'archive' / layout.archive_name(layout.SUMMER))
    total = args.num_scenes * args.patches_per_scene
    print(f'{"source":8} {"config":11} {"workers":>7} {"seconds":>8} {"patches/s":>10}')
    for source in ('tree', 'archive'):
      for config in args.configs.split(','):
        for workers in (int(w) for w in args.workers.split(',')):
          data_dir = tmp / 'tfds'
          start = time.perf_counter()
          build.build(tmp / source, data_dir, config, num_workers=workers, progress=False)
          seconds = time.perf_counter() - start
          shutil.rmtree(data_dir)
          print(f'{source:8} {config:11} {workers:7d} {seconds:8.2f} {total / seconds:10.1f}')


if __name__ == '__main__':
  main()
