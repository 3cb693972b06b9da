"""Where the time goes: the compiled train step or U-Net forward, broken down by XLA op.

Runs the program under `jax.profiler.trace` on one device, reads the trace back with
`jax.profiler.ProfileData`, and sums the events of the XLA threads (CPU) or the GPU's
kernels by op kind: the fusion's name without its number (`ynn_fusion`,
`input_reduce_fusion`, ...; cuDNN and cuBLAS kernels by their name's start). On a GPU
a second table lists the kernels one by one, and a third sums them by the kind of work
(`work_kind`: convolutions, GEMMs, attention, Pallas kernels, XLA reductions, the
rest). Times are per call of the program; YNNPACK fusions (convolutions, dots and
reductions) share one kind, so `--dump_hlo DIR` also writes the optimised HLO to match
op names against, and `--trace_dir DIR` keeps the trace (TensorBoard's profile plugin
opens it). Appends the tables to bench/RESULTS.md.

  python -m bench.profile --dim 32 --dim_mults 1,2,4 --image_size 64 --batch 4 \
      --program train_step
  python -m bench.profile --dim 32 --dim_mults 1,2,4 --image_size 64 --batch 13 \
      --program forward

Read the loop fusions' times with care: in the U-Net forward a GroupNorm + SiLU loop
that follows a YNNPACK convolution reads 7-8 ms per 64x64x32 batch-13 tensor here, while
the same loop alone runs in 1-3 ms; end-to-end timings decide.

On a CPU pin it to one core (`taskset -c 0`) to see one device's share of a sharded
step: batch 4 of a global 8 on 2 devices, 13 of the 26 images of a sampling run.
"""

# pylint: disable=g-import-not-at-top,g-bad-import-order
from bench import common  # First: sets the environment jax reads at import.

import argparse
import collections
import functools
import glob
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from eo_ddpm_jax import train_step as train_lib

PROGRAMS = ('train_step', 'forward')


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_model_flags(parser)
  parser.add_argument('--batch', type=int, default=4, help='Batch on the one device.')
  parser.add_argument('--program', choices=PROGRAMS, default='train_step',
                      help='train_step: the full step (loss, gradients, AdamW, EMA); '
                           'forward: one U-Net forward, as each sampling step runs it.')
  parser.add_argument('--calls', type=int, default=5, help='Profiled calls (after 3 warm-up).')
  parser.add_argument('--top', type=int, default=15, help='Op kinds listed.')
  parser.add_argument('--trace_dir', default='',
                      help='Keep the profiler trace here (TensorBoard/XProf can open it).')
  parser.add_argument('--dump_hlo', default='',
                      help='Folder for the optimised HLO (sets XLA_FLAGS=--xla_dump_to).')
  args = parser.parse_args(argv)
  # The shared flags include the library comparison's; this script profiles JAX only.
  if args.compare_torch or args.torch_threads:
    parser.error('--compare-torch/--torch_threads: bench.profile profiles JAX only; '
                 'bench.train_step and bench.sample compare with the library.')
  if args.peak_tflops is not None:
    parser.error('--peak_tflops: bench.profile reports time per op, not utilisation; '
                 'bench.train_step and bench.sample report the MFU.')
  return args


def build_program(args, config):
  """Returns (run, description): run() executes one call and waits for it."""
  model = train_lib.create_model(config.model)
  shape = (args.batch, args.image_size, args.image_size, args.channels)
  images = jnp.asarray(np.random.default_rng(args.seed).uniform(-1, 1, shape), jnp.float32)
  if args.program == 'forward':
    params = jax.jit(model.init)(jax.random.PRNGKey(args.seed), images[:1],
                                 jnp.zeros((1,), jnp.int32))['params']
    t = jnp.full((args.batch,), config.diffusion.timesteps // 2, jnp.int32)
    forward = jax.jit(lambda p, x: model.apply({'params': p}, x, t))
    return lambda: jax.block_until_ready(forward(params, images)), 'U-Net forward'
  learning_rate_fn = train_lib.create_learning_rate_fn(config.optim, 1000)
  tx = train_lib.create_optimizer(config.optim, learning_rate_fn)
  step = jax.jit(train_lib.make_train_step(config, model, tx,
                                           train_lib.create_schedule(config.diffusion),
                                           learning_rate_fn), donate_argnums=(0,))
  init = functools.partial(train_lib.create_train_state, config, model, tx,
                           image_shape=shape[1:])
  holder = [jax.jit(init)(jax.random.PRNGKey(args.seed))]

  def run():
    holder[0], metrics = step(holder[0], {'image': images})
    jax.block_until_ready(metrics)
  return run, 'full train step'


def _op_kind(name: str) -> str:
  """One row per kind of op: 'loop_add_fusion.12' (CPU op) and 'loop_add_fusion_12'
  (GPU kernel) -> 'loop_add_fusion'; library kernels (cuDNN, cuBLAS) by their first 40
  characters, which name the algorithm ('sm90_xmma_wgrad_...')."""
  return re.sub(r'[._]\d+$', '', name)[:40]


# GPU kernels by the kind of work, from their names: cuDNN's convolution kernels
# ('sm90_xmma_fprop_implicit_gemm_...', dgrad, wgrad), its fused attention ('..._sdpa_...'),
# GEMMs (XLA's Triton GEMM fusions, cuBLAS's nvjet and cutlass kernels), Pallas kernels
# (named after their Python function, '_apply_context_kernel'), and XLA's own fusions,
# split into those that reduce and the elementwise loops and copies.
WORK_KINDS = (
    ('full attention (cuDNN)', re.compile(r'sdpa|flash|fmha')),
    ('convolutions (cuDNN)', re.compile(r'implicit_gemm|fprop|dgrad|wgrad|cudnn|cask')),
    ('GEMMs', re.compile(
        r'^(gemm_fusion|nvjet|cutlass|void cutlass|sm\d+_xmma_gemm|triton_gemm)')),
    ('Pallas kernels', re.compile(r'^_\w*kernel')),
    ('XLA reductions', re.compile(r'reduce|softmax')),
)


def work_kind(kernel_name: str) -> str:
  """The kind of work a GPU kernel does, from its name (see WORK_KINDS); else 'XLA
  elementwise and copies'."""
  for kind, pattern in WORK_KINDS:
    if pattern.search(kernel_name):
      return kind
  return 'XLA elementwise and copies'


def op_times(trace_dir: str, calls: int) -> tuple[collections.Counter, collections.Counter]:
  """Milliseconds per call by op kind, and by GPU kernel (empty on a CPU).

  CPU: the events of the XLA threads. GPU: the kernels on the device plane's streams.
  """
  path = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True))[-1]
  ops, kernels = collections.Counter(), collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    on_gpu = plane.name.startswith('/device:GPU')
    for line in plane.lines:
      if not (line.name.startswith('Stream') if on_gpu else line.name.startswith('tf_XLA')):
        continue  # Python and runtime threads.
      for event in line.events:
        # The executor's own spans enclose the ops; 'end: x' marks a finished async op.
        if event.name.startswith(('ThunkExecutor', 'end: ')):
          continue
        ms = event.duration_ns / 1e6 / calls
        ops[_op_kind(event.name)] += ms
        if on_gpu:
          kernels[event.name[:90]] += ms
  return ops, kernels


def main(argv):
  args = parse_args(argv)
  if args.dump_hlo:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_dump_to={args.dump_hlo} --xla_dump_hlo_as_text')
  config = common.study_config(args, args.batch)
  run, description = build_program(args, config)
  for _ in range(3):
    run()
  start = time.perf_counter()
  for _ in range(args.calls):
    run()
  call_ms = (time.perf_counter() - start) / args.calls * 1e3
  with tempfile.TemporaryDirectory() as temp_dir:
    trace_dir = args.trace_dir or temp_dir
    with jax.profiler.trace(trace_dir):
      for _ in range(args.calls):
        run()
    ops, kernels = op_times(trace_dir, args.calls)

  traced = sum(ops.values())
  rows = [(kind, f'{ms:.2f} ms', f'{ms / traced:.1%}')
          for kind, ms in ops.most_common(args.top)]
  rows.append(('all ops (traced)', f'{traced:.1f} ms', '100%'))
  table = common.markdown_table(['op kind', 'time per call', 'share'], rows)
  if kernels:
    busy = sum(kernels.values())
    rows = [(f'`{name}`', f'{ms:.2f} ms', f'{ms / busy:.1%}')
            for name, ms in kernels.most_common(args.top)]
    rows.append(('all kernels', f'{busy:.1f} ms', f'{busy / call_ms:.0%} of the call'))
    table += '\n\n' + common.markdown_table(['GPU kernel', 'time per call', 'share'], rows)
    by_kind = collections.Counter()
    for name, ms in kernels.items():
      by_kind[work_kind(name)] += ms
    rows = [(kind, f'{ms:.1f} ms', f'{ms / busy:.1%}') for kind, ms in by_kind.most_common()]
    table += '\n\n' + common.markdown_table(['GPU work', 'time per call', 'share'], rows)
  facts = common.jax_device_facts()
  notes = [
      f'{description}: {common.describe_unet(args)}, batch '
      f'{args.batch} of {args.image_size}x{args.image_size}x{args.channels}, '
      f'{args.precision}, one {facts["platform"]} device.',
      f'Untraced: {call_ms:.1f} ms per call (mean of {args.calls} calls after 3 '
      'warm-up calls). Traced: op events of the XLA threads (CPU) or kernels of the GPU\'s '
      'streams per call; tracing adds a few %. On a GPU, the kernels\' total over the '
      'call time is how busy the GPU was.',
      args.note,
  ]
  common.report(f'Profile by XLA op, {description}, {args.precision}, batch {args.batch}, '
                f'{facts["platform"]}', table, notes, args.results)


if __name__ == '__main__':
  main(sys.argv[1:])
