"""Speed of the FID Inception features: split over all devices vs on one device.

`--mode=evaluate` extracts the Inception features of every checkpoint's samples (and,
once, of the reals) with `inception.make_feature_fn`. It splits each batch over the
mesh of all devices, as sampling does; before, the network ran on one device (on every
host of a multi-host run). This times both on the same images and random weights:

  python -m bench.inception_features                  # 32x32 (demo) and 128x128 (study)
  python -m bench.inception_features --image_sizes 128 --batches 4

On a CPU-only host it makes one JAX CPU device per core, as main.py does.
"""

# pylint: disable=g-import-not-at-top,g-bad-import-order
from bench import common  # First: sets the environment jax reads at import.

import argparse
import sys

import jax
import ml_collections
import numpy as np

from eo_ddpm_jax import cpu_devices
from eo_ddpm_jax import fid
from eo_ddpm_jax import inception
from eo_ddpm_jax import sampling
from eo_ddpm_jax import train_step as train_lib


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--image_sizes', default='32,128',
                      help='Comma-separated sample sizes (the network resizes to 299).')
  parser.add_argument('--batch_size', type=int, default=50,
                      help="eval.inception_batch_size (pytorch-fid's default).")
  parser.add_argument('--batches', type=int, default=2, help='Batches per timed run.')
  parser.add_argument('--repeats', type=int, default=3, help='Timed runs of each.')
  common.add_report_flags(parser)
  return parser.parse_args(argv)


def main(argv):
  args = parse_args(argv)
  # One device per core on a CPU host, sized as for a batch of this many images.
  cpu_devices.configure(ml_collections.ConfigDict(dict(
      cpu_devices=0, batch_size=args.batch_size, grad_accum_steps=1, num_processes=1)))
  mesh = train_lib.make_mesh()
  batch_size = sampling.sharded_batch_size(args.batch_size, mesh.size)
  network = inception.FIDInceptionV3()
  # Random weights: the speed does not depend on them, and no download is needed.
  variables = jax.jit(network.init)(jax.random.PRNGKey(0),
                                    np.zeros((1, 32, 32, 3), np.float32))

  rows = []
  for size in (int(s) for s in args.image_sizes.split(',')):
    images = np.random.default_rng(0).uniform(-1, 1, (args.batches * batch_size, size, size,
                                                      3)).astype(np.float32)
    batches = [images[i:i + batch_size] for i in range(0, images.shape[0], batch_size)]
    features = {}
    for name, on in ((f'split over {mesh.size} devices (evaluate)', mesh),
                     ('one device (before)', None)):
      feature_fn = inception.make_feature_fn(variables, on)

      def run(feature_fn=feature_fn, name=name):
        features[name] = fid.extract_features(feature_fn, batches, batch_size)
      run()  # Compilation.
      timing = common.time_blocks(run, args.repeats, images.shape[0])
      rows.append([f'{size}x{size}', name, f'{1 / timing.median:.1f}',
                   f'{timing.median * batch_size:.2f} s', timing.spread])
      print(common.markdown_table(['samples', 'Inception on', 'images/s', 'per batch',
                                   'spread per image'], rows[-1:]), flush=True)
    first, second = features.values()
    error = np.abs(first - second).max() / np.abs(second).max()
    rows[-1].append(f'{error:.1e}')
    rows[-2].append('')

  facts = common.jax_device_facts()
  notes = [
      f'FID Inception-v3 (random weights), batches of {batch_size} '
      f'(eval.inception_batch_size {args.batch_size} rounded up to a multiple of '
      f'{mesh.size} devices), {args.batches} batches per run, resized to 299x299 inside.',
      f'Timing: one untimed run (compilation), then {args.repeats} timed runs; images/s '
      'from the median run, through fid.extract_features as evaluate calls it.',
      'max |diff|: the largest difference between the two ways\' features, relative to '
      'the largest feature.',
      args.note,
  ]
  common.report(f'Inception features for FID, {facts["kind"]}',
                common.markdown_table(['samples', 'Inception on', 'images/s', 'per batch',
                                       'spread per image', 'max |diff|'], rows),
                notes, args.results)


if __name__ == '__main__':
  main(sys.argv[1:])
