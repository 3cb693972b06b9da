"""The train step compiled for an NVIDIA GPU on a machine without one: its kernels, their
memory traffic and its memory, read from XLA's optimised GPU program.

XLA compiles for a described GPU without the device (deviceless AOT:
`jax.experimental.topologies` with a target config). The optimised HLO lists the kernels
a step launches (fusions, cuDNN convolutions and attention, Triton GEMMs); each kernel's
operand and result bytes (bench/hlo_traffic.py), summed, are the step's memory traffic
(an operand that only feeds slices counts only the elements they keep), and XLA's
buffer assignment gives its temporary memory. No GPU runs anything, so there are no
timings: this measures the bytes a change saves, on any machine, before a GPU confirms
the time.
Checked against the cards (bench/RESULTS.md): at eea3a5f it gives 47.4 GiB of temporaries
where the H200 measured a 49.0 GiB peak, and at 3ef6ece (float32, batch 8) the same
fusion counts as the H100's profile (687 vs 688 reductions, 184 and 102 loops).

Set-up, once, outside the project's environment (~900 MB; the GPU compiler, cuDNN):
  python -m pip install --no-deps --target .gpu_compile nvidia-cudnn-cu12 \\
      jax-cuda12-plugin==$JAX_VERSION jax-cuda12-pjrt==$JAX_VERSION
where $JAX_VERSION is the installed jax's. Then:
  PYTHONPATH=.gpu_compile JAX_PLATFORMS=cpu python -m bench.gpu_compile
  PYTHONPATH=... JAX_PLATFORMS=cpu python -m bench.gpu_compile --batch 8 --precision float32
"""

# pylint: disable=g-import-not-at-top,g-bad-import-order
from bench import common  # First: sets the environment jax reads at import.

import argparse
import collections
import sys
import time

from jax.experimental import topologies

from bench import hlo_traffic
from bench import roofline
from eo_ddpm_jax import fused_linear_attention as fused
from eo_ddpm_jax import train_step as train_lib

# The GPUs' descriptions for XLA's compiler (public datasheet figures; XLA's GPU
# target-config text format). The H100 and H200 differ only in memory size and
# bandwidth; the A100 (SXM, 80 GB) has fewer SMs and less shared memory per block,
# which decides what Triton kernels fit.
_TARGET_CONFIG = """
gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {shared_per_core} threads_per_core_limit: 2048
  core_count: {cores} fpus_per_core: {fpus} block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535 block_dim_limit_z: 65535 memory_bandwidth: {bandwidth}
  l2_cache_size: {l2} clock_rate_ghz: {clock} device_memory_size: {memory}
  shared_memory_per_block_optin: {shared_per_block}
  cuda_compute_capability {{ major: {major} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 7 }}
runtime_version {{ major: 12 minor: 8 patch: 0 }}
device_description_str: "{name}"
"""
_HOPPER = dict(major=9, cores=132, fpus=128, shared_per_core=233_472,
               shared_per_block=232_448, l2=52_428_800, clock=1.98)
CARDS = {
    'H100': dict(_HOPPER, name='NVIDIA H100 80GB HBM3', memory=84_929_347_584),
    'H200': dict(_HOPPER, name='NVIDIA H200', memory=150_754_820_096),
    'A100': dict(major=8, cores=108, fpus=64, shared_per_core=167_936,
                 shared_per_block=166_912, l2=41_943_040, clock=1.41,
                 name='NVIDIA A100-SXM4-80GB', memory=85_899_345_920),
}
for _card, _facts in CARDS.items():
  _facts['bandwidth'] = int(common.HBM_BANDWIDTH_TBS[_card] * 1e12)  # bytes/s
def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_model_flags(parser)
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--card', choices=sorted(CARDS), default='H100')
  parser.add_argument('--dump_hlo', default='',
                      help='Also write the optimised HLO text to this file.')
  parser.set_defaults(precision='bfloat16')
  return parser.parse_args(argv)


def gpu_topology(card: str):
  """One described `card` (a key of CARDS) for XLA to compile for, without the device."""
  try:
    return topologies.get_topology_desc(
        platform='cuda', topology='1x1x1', target_config=_TARGET_CONFIG.format(**CARDS[card]))
  except Exception as error:  # pylint: disable=broad-except
    raise SystemExit(
        f'Cannot compile for a GPU here ({type(error).__name__}: {error}). Install the '
        'GPU compiler beside this jax (see `python -m bench.gpu_compile --help`) and put '
        'it on PYTHONPATH.') from error


def compile_for_gpu(args):
  """The train step compiled for args.card; returns (compiled, compile seconds, (full
  attention, linear attention) kernels as resolved for the GPU)."""
  topology = gpu_topology(args.card)
  capability = f'{CARDS[args.card]["major"]}.0'
  # 'auto' and the fused kernels' tilings resolve for the GPU, not this machine's backend.
  fused.TARGET_COMPUTE_CAPABILITY = capability
  common.set_linear_attention_tilings(args.linear_attention_tilings)
  attention = train_lib.attention_impl(args.attention_impl, args.precision, backend='gpu')
  linear = train_lib.linear_attention_impl(
      args.linear_attention_impl, args.precision, backend='gpu',
      compute_capability=capability)
  step, state, batch = roofline.abstract_step(args, attention, linear)
  mesh = train_lib.make_mesh(topology.devices)
  jitted = train_lib.compile_train_step(step, mesh, train_lib.replicated_sharding(mesh, state),
                                        train_lib.batch_sharding(mesh))
  start = time.perf_counter()
  compiled = jitted.lower(state, batch).compile()
  return compiled, time.perf_counter() - start, (attention, linear)


def main(argv):
  args = parse_args(argv)
  compiled, compile_s, (attention, linear) = compile_for_gpu(args)
  text = compiled.as_text()
  if args.dump_hlo:
    with open(args.dump_hlo, 'w', encoding='utf-8') as f:
      f.write(text)
  found = hlo_traffic.kernels(text)
  total = sum(k['bytes'] for k in found)
  bandwidth = CARDS[args.card]['bandwidth']

  def table(key, top):
    count, moved = collections.Counter(), collections.Counter()
    for k in found:
      count[k[key]] += 1
      moved[k[key]] += k['bytes']
    rows = [[name, f'{count[name]:,}', f'{moved[name] / 1e9:,.1f}',
             f'{moved[name] / total:.1%}'] for name, _ in moved.most_common(top)]
    return common.markdown_table([key, 'kernels', 'GB moved', 'share'], rows)

  memory = compiled.memory_analysis()
  common.report(
      f'GPU program of the train step (deviceless compile for an {args.card}), '
      f'{args.precision}, batch {args.batch}',
      table('layer', 10) + '\n\n' + table('kind', 16),
      [f'{common.describe_unet(args)}, {args.image_size}x{args.image_size}x'
       f'{args.channels}; full attention: {attention}; linear attention: {linear}.',
       f'Compiled by XLA for a described {CARDS[args.card]["name"]} on this machine, with no '
       f'GPU (jax.experimental.topologies): {compile_s:.0f} s. Nothing ran: no timings.',
       f'**{len(found):,} kernels moving {total / 1e9:,.1f} GB per step** (each kernel\'s '
       f'operands and results, read or written once; of an operand that only feeds '
       f'slices, what they keep); at the card\'s '
       f'{bandwidth / 1e12:.2f} TB/s that alone takes {total / bandwidth * 1e3:.1f} ms.',
       f'Temporary memory (XLA buffer assignment): '
       f'{memory.temp_size_in_bytes / 2**30:.2f} GiB; arguments '
       f'{memory.argument_size_in_bytes / 2**30:.2f} GiB.',
       'Layers by roofline.layer_kind of each kernel\'s op name (a fusion is charged to '
       'the layer of its root op).',
       args.note],
      args.results)


if __name__ == '__main__':
  main(sys.argv[1:])
