"""The fused linear attention's Triton kernels compiled for an NVIDIA GPU on a machine
without one: per kernel, its registers, spills, shared memory, occupancy and the machine
instructions (SASS) of its loop per position.

XLA compiles one linear-attention layer (forward and backward, `fused_linear_attention`)
for a described card (as bench/gpu_compile.py does) and dumps each kernel's PTX; `ptxas`
assembles it for the card, as XLA does, reporting registers and spills, and `cuobjdump`
lists the SASS; Triton's own IR dump gives the shared memory it allocates. Occupancy
follows: how many programs fit one SM's 64K registers and its shared memory. Nothing
runs: a kernel's time is for a GPU to measure (bench/linear_attention_kernels.py);
bench/RESULTS.md records how far these counts went towards explaining it. Works with the
GPU compiler of jax 0.10 and 0.11.

Set-up, once (beside bench/gpu_compile.py's): ptxas, cuobjdump and the nvdisasm it
runs, for CUDA 12, e.g. from Triton's wheel:
  python -m pip download --no-deps -d /tmp/triton triton
  unzip -j /tmp/triton/triton-*.whl 'triton/backends/nvidia/bin/*' -d .cuda_bin
  PYTHONPATH=.gpu_compile JAX_PLATFORMS=cpu python -m bench.kernel_sass --cuda_bin .cuda_bin
"""

# pylint: disable=g-import-not-at-top,g-bad-import-order,protected-access
from bench import common  # First: sets the environment jax reads at import.

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from bench import gpu_compile
from eo_ddpm_jax import fused_linear_attention as fused
from eo_ddpm_jax import train_step as train_lib

MEMORY_SLOTS = 4  # The library's num_mem_kv.
_REGISTERS_PER_SM = 65536
_MAX_WARPS_PER_SM = 64
_RESERVED_SHARED_KIB_PER_BLOCK = 1  # CUDA's, out of each SM's shared memory.


def _arch(card: str) -> str:
  """ptxas's target for the card: sm_90a (Hopper, with its wgmma) or sm_80."""
  major = gpu_compile.CARDS[card]['major']
  return f'sm_{major}0a' if major >= 9 else f'sm_{major}0'


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--card', choices=sorted(gpu_compile.CARDS), default='H200')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--layers', default='16384x64,4096x128',
                      help='Comma-separated POSITIONSxCHANNELS (the study at 128x128).')
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--dim_head', type=int, default=32)
  parser.add_argument('--linear_attention_tilings', default='',
                      help='NAME=ELEMENTS/WARPS/STAGES,... (bench/common.py); default: '
                           "the kernels' own.")
  parser.add_argument('--cuda_bin', default=os.environ.get('CUDA_BIN', ''),
                      help='Folder with ptxas, cuobjdump and nvdisasm (default: on PATH).')
  common.add_report_flags(parser)
  return parser.parse_args(argv)


def _tool(cuda_bin: str, name: str) -> str:
  path = os.path.join(cuda_bin, name) if cuda_bin else shutil.which(name)
  if not path or not os.path.exists(path):
    raise SystemExit(f'{name} not found{" in " + cuda_bin if cuda_bin else " on PATH"}; '
                     'see `python -m bench.kernel_sass --help` for where to get it.')
  return path


def compile_layer(args, topology, n: int, c: int) -> None:
  """Compiles one layer's forward and backward for args.card (XLA dumps its PTX)."""
  heads, d = args.heads, args.dim_head
  sharding = jax.sharding.SingleDeviceSharding(topology.devices[0])

  def loss(y, w_q, w_k, w_v, w_out, mem_kv):
    out = fused.fused_linear_attention(y, w_q, w_k, w_v, w_out, mem_kv, d ** -0.5)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  def spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  # Lowered under the card's mesh: from jax 0.11 Pallas asks the context mesh which GPU
  # it compiles for when no GPU is attached.
  mesh = train_lib.make_mesh(topology.devices)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    jax.jit(jax.value_and_grad(loss, argnums=range(6))).lower(
        spec((args.batch, n, c), jnp.bfloat16), spec((c, heads * d)), spec((c, heads * d)),
        spec((c, heads, d)), spec((heads, d, c)), spec((2, MEMORY_SLOTS, heads, d))).compile()


def _loop(sass: str) -> list[str]:
  """The opcodes of the kernel's innermost loop: from the target of its last backward
  branch to that branch (the kernels each have one loop over their chunk's rows)."""
  lines = re.findall(r'/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+ )?)([A-Z][\w.]*)([^;]*);', sass)
  start = end = None
  for address, _, opcode, operands in lines:
    target = re.search(r'0x([0-9a-f]+)', operands)
    if opcode == 'BRA' and target and int(target.group(1), 16) < int(address, 16):
      start, end = int(target.group(1), 16), int(address, 16)
  if start is None:
    return []
  return [opcode for address, _, opcode, _ in lines if start <= int(address, 16) <= end]


def _shared_bytes(dump_dir: str, kernel_name: str) -> int:
  """The shared memory Triton allocated for the kernel (`ttg.shared` in its IR dump)."""
  for path in glob.glob(f'{dump_dir}/*.{kernel_name}.triton-to-llvm.txt'):
    found = re.findall(r'ttg\.shared = (\d+)', open(path, encoding='utf-8').read())
    if found:
      return int(found[-1])
  raise SystemExit(f'No Triton IR dump for {kernel_name} in {dump_dir}: this XLA may name '
                   'its dumps differently.')


def analyse(ptx_path: str, dump_dir: str, args) -> dict:
  """One kernel's counts from its PTX file and Triton's IR dump beside it."""
  ptx = open(ptx_path, encoding='utf-8').read()
  name = re.search(r'\.entry (\w+)', ptx).group(1)
  cubin = ptx_path[:-len('.ptx')] + '.cubin'
  assembled = subprocess.run(
      [_tool(args.cuda_bin, 'ptxas'), '-v', f'-arch={_arch(args.card)}', ptx_path, '-o',
       cubin], capture_output=True, text=True, check=True).stderr
  sass = subprocess.run([_tool(args.cuda_bin, 'cuobjdump'), '-sass', cubin],
                        capture_output=True, text=True, check=True).stdout
  registers = int(re.search(r'Used (\d+) registers', assembled).group(1))
  spills = int(re.search(r'(\d+) bytes spill stores', assembled).group(1))
  warps = int(re.search(r'\.reqntid (\d+)', ptx).group(1)) // 32
  shared_kib = _shared_bytes(dump_dir, name) / 1024
  # Registers are allocated per warp in blocks of 256 (8 per thread).
  by_registers = _REGISTERS_PER_SM // (-(-registers // 8) * 8 * 32 * warps)
  shared_kib_per_sm = gpu_compile.CARDS[args.card]['shared_per_core'] / 1024
  by_shared = int(shared_kib_per_sm // (shared_kib + _RESERVED_SHARED_KIB_PER_BLOCK))
  programs = min(by_registers, by_shared, _MAX_WARPS_PER_SM // warps)
  return dict(name=name, warps=warps,
              registers=registers, spills=spills, shared_kib=shared_kib,
              warps_per_sm=programs * warps, loop=_loop(sass))


def main(argv):
  args = parse_args(argv)
  # The card's tilings, not this machine's (fused.tilings), before any are replaced.
  fused.TARGET_COMPUTE_CAPABILITY = f'{gpu_compile.CARDS[args.card]["major"]}.0'
  common.set_linear_attention_tilings(args.linear_attention_tilings)
  # XLA reads its flags when its first backend starts, which is below: the PTX dump.
  dump_dir = tempfile.mkdtemp(prefix='kernel_sass_')
  user_flags = os.environ.get('XLA_FLAGS', '')
  os.environ['XLA_FLAGS'] = (f'{user_flags} --xla_dump_to={dump_dir} '
                             '--xla_dump_emitter_re=.*')  # .*: PTX and Triton's IR.
  topology = gpu_compile.gpu_topology(args.card)
  rows = []
  for layer in args.layers.split(','):
    n, c = (int(v) for v in layer.split('x'))
    seen = set(glob.glob(f'{dump_dir}/*.ptx'))
    compile_layer(args, topology, n, c)
    for path in sorted(set(glob.glob(f'{dump_dir}/*.ptx')) - seen):
      if not re.search(r'\.entry _\w+_kernel\b', open(path, encoding='utf-8').read()):
        continue  # One of XLA's own kernels.
      k = analyse(path, dump_dir, args)
      kernel = k['name'][1:-len('_kernel')]
      tiling = fused.tilings()[kernel]
      step_rows = fused._layout(n, None, c, tiling)[1]
      mix = collections.Counter(op.split('.')[0] for op in k['loop']).most_common(4)
      per_position = (f'{len(k["loop"]) * k["warps"] / step_rows:.1f}' if k['loop'] else
                      'no loop found')
      rows.append([f'{n}x{c}', kernel,
                   f'{tiling.block_elements}/{tiling.num_warps}/{tiling.num_stages or 0}',
                   step_rows, k['registers'], k['spills'], f'{k["shared_kib"]:.0f}',
                   k['warps_per_sm'], len(k['loop']),
                   per_position, ' '.join(f'{op} {count}' for op, count in mix)])
  shutil.rmtree(dump_dir, ignore_errors=True)
  os.environ['XLA_FLAGS'] = user_flags  # The report's command line: the user's.
  table = common.markdown_table(
      ['positions x channels', 'kernel', 'tiling', 'rows per step', 'registers',
       'spill bytes', 'shared KiB', 'warps per SM', 'loop instructions',
       'warp instructions per position', 'most frequent in the loop'], rows)
  common.report(
      f'Fused linear attention kernels compiled for an {args.card} (SASS, no GPU), '
      f'batch {args.batch}', table,
      [f'{args.heads} heads x {args.dim_head}; bfloat16; kernels of one layer\'s forward '
       'and backward, compiled by XLA for a described card (jax.experimental.topologies), '
       f'assembled by ptxas for {_arch(args.card)}. Nothing ran: no timings.',
       'Warps per SM: the programs that fit one SM by registers and shared memory, times '
       'the warps of each. Warp instructions per position: the loop\'s '
       'instructions x warps / rows per step.',
       args.note],
      args.results)


if __name__ == '__main__':
  main(sys.argv[1:])
