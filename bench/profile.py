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
opens it). With `--dump_hlo`, a last table puts XLA's own kernels against the bytes
they move (bench/hlo_traffic.py): achieved TB/s and, on a listed GPU, the time each
spends over its floor at the card's bandwidth, most first, with the op it came from:
where a memory-bound step loses its time. Appends the tables to bench/RESULTS.md.

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

from bench import hlo_traffic
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
  """Milliseconds per call by op kind, and by event name (a GPU kernel's or, on a CPU,
  an XLA op's: 'input_reduce_fusion_3', 'input_reduce_fusion.3').

  CPU: the events of the XLA threads. GPU: the kernels on the device plane's streams.
  """
  path = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True))[-1]
  ops, events = collections.Counter(), collections.Counter()
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
        events[event.name] += ms
  return ops, events


def shortened(name: str, width: int) -> str:
  """`name` cut to `width` characters by dropping its middle: cuDNN's and cuBLAS's kernel
  names share long prefixes and differ in their template arguments at the end."""
  if len(name) <= width:
    return name
  tail = width // 3
  return f'{name[:width - tail - 3]}...{name[-tail:]}'


def _event_name(hlo_name: str) -> str:
  """A GPU kernel is named after its HLO fusion with '_' for '.': 'input_reduce_fusion.3'
  -> 'input_reduce_fusion_3'. CPU events keep the HLO name; both map to this key."""
  return hlo_name.replace('.', '_')


def kernel_traffic(hlo_dir: str, events: collections.Counter) -> dict[str, dict]:
  """The bytes each kernel of the profiled program moves (`hlo_traffic.kernels`), keyed by
  `_event_name`. The program is the optimised module in the XLA dump folder `hlo_dir`
  whose kernel names carry the most of the profiled `events`' time (the dump also holds
  set-up programs: initialisation, random keys). Library kernels (cuDNN, cuBLAS, Pallas)
  carry their own names in a trace and match nothing."""
  best, best_ms = {}, 0.0
  for path in glob.glob(os.path.join(hlo_dir, '*after_optimizations.txt')):
    with open(path, encoding='utf-8') as f:
      traffic = {_event_name(k['name']): k for k in hlo_traffic.kernels(f.read())}
    matched_ms = sum(ms for name, ms in events.items() if _event_name(name) in traffic)
    if matched_ms > best_ms:
      best, best_ms = traffic, matched_ms
  return best


def traffic_rows(events: collections.Counter, traffic: dict[str, dict],
                 bandwidth_tbs: float | None) -> list[dict]:
  """The profiled kernels whose bytes are known, as dicts: name, ms (per call), gb,
  tbs (achieved TB/s), floor_ms (their bytes at `bandwidth_tbs`, None without one),
  over_ms (ms - floor_ms) and op (the JAX name stack). Most time over the floor first;
  without a bandwidth, the slowest first."""
  rows = []
  for name, ms in events.items():
    kernel = traffic.get(_event_name(name))
    if kernel is None or ms <= 0:
      continue
    gb = kernel['bytes'] / 1e9
    floor_ms = gb / bandwidth_tbs if bandwidth_tbs else None  # GB / (TB/s) = ms
    rows.append(dict(name=name, ms=ms, gb=gb, tbs=gb / ms, floor_ms=floor_ms,
                     over_ms=ms - floor_ms if bandwidth_tbs else None,
                     op=kernel['op_name'].partition('/')[2] or kernel['op_name']))
  return sorted(rows, key=lambda r: -(r['over_ms'] if bandwidth_tbs else r['ms']))


def traffic_table(rows: list[dict], bandwidth_tbs: float | None, top: int) -> tuple[str, str]:
  """(markdown table of the first `top` rows, a one-line summary of them all)."""
  header = ['kernel', 'time per call', 'GB moved', 'TB/s']
  if bandwidth_tbs:
    header.append(f'over its floor at {bandwidth_tbs:g} TB/s')
  header.append('op')
  table = []
  for r in rows[:top]:
    cells = [f'`{r["name"][:40]}`', f'{r["ms"]:.2f} ms', f'{r["gb"]:.3f}', f'{r["tbs"]:.3f}']
    if bandwidth_tbs:
      cells.append(f'{r["over_ms"]:.2f} ms')
    table.append(cells + [f'`{r["op"][-70:]}`'])
  ms, gb = sum(r['ms'] for r in rows), sum(r['gb'] for r in rows)
  summary = (f'the {len(rows):,} profiled kernels named in the HLO (on a GPU, XLA\'s '
             'fusions and Triton GEMMs; not cuDNN\'s, cuBLAS\'s or Pallas\'s) took '
             f'{ms:.1f} ms per call moving {gb:.1f} GB: {gb / ms if ms else 0:.2f} TB/s')
  if bandwidth_tbs:
    summary += f', where the card\'s {bandwidth_tbs:g} TB/s needs {gb / bandwidth_tbs:.1f} ms'
  return common.markdown_table(header, table), summary + '.'


def main(argv):
  args = parse_args(argv)
  if args.dump_hlo:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_dump_to={args.dump_hlo} --xla_dump_hlo_as_text')
  config = common.study_config(args, args.batch)
  common.set_linear_attention_tilings(args.linear_attention_tilings)
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
    ops, events = op_times(trace_dir, args.calls)

  facts = common.jax_device_facts()
  traced = sum(ops.values())
  rows = [(kind, f'{ms:.2f} ms', f'{ms / traced:.1%}')
          for kind, ms in ops.most_common(args.top)]
  rows.append(('all ops (traced)', f'{traced:.1f} ms', '100%'))
  table = common.markdown_table(['op kind', 'time per call', 'share'], rows)
  if facts['platform'] == 'gpu':
    busy = sum(events.values())
    rows = [(f'`{shortened(name, 90)}`', f'{ms:.2f} ms', f'{ms / busy:.1%}')
            for name, ms in events.most_common(args.top)]
    rows.append(('all kernels', f'{busy:.1f} ms', f'{busy / call_ms:.0%} of the call'))
    table += '\n\n' + common.markdown_table(['GPU kernel', 'time per call', 'share'], rows)
    by_kind = collections.Counter()
    for name, ms in events.items():
      by_kind[work_kind(name)] += ms
    rows = [(kind, f'{ms:.1f} ms', f'{ms / busy:.1%}') for kind, ms in by_kind.most_common()]
    table += '\n\n' + common.markdown_table(['GPU work', 'time per call', 'share'], rows)
  traffic_summary = ''
  if args.dump_hlo:
    bandwidth = common.card_figure(common.HBM_BANDWIDTH_TBS, facts['kind'],
                                   facts['platform'])
    traffic, traffic_summary = traffic_table(
        traffic_rows(events, kernel_traffic(args.dump_hlo, events), bandwidth), bandwidth, args.top)
    table += '\n\n' + traffic
  notes = [
      f'{description}: {common.describe_unet(args)}, batch '
      f'{args.batch} of {args.image_size}x{args.image_size}x{args.channels}, '
      f'{args.precision}, one {facts["platform"]} device.',
      f'Untraced: {call_ms:.1f} ms per call (mean of {args.calls} calls after 3 '
      'warm-up calls). Traced: op events of the XLA threads (CPU) or kernels of the GPU\'s '
      'streams per call; tracing adds a few %. On a GPU, the kernels\' total over the '
      'call time is how busy the GPU was.',
      traffic_summary and (
          'Kernels against memory (from --dump_hlo\'s optimised HLO, bench/hlo_traffic.py: '
          'each kernel\'s operands and results, read or written once): ' + traffic_summary),
      args.note,
  ]
  common.report(f'Profile by XLA op, {description}, {args.precision}, batch {args.batch}, '
                f'{facts["platform"]}', table, notes, args.results)


if __name__ == '__main__':
  main(sys.argv[1:])
