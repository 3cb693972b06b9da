"""Shared pieces of the benchmarks: flags, timing, the PyTorch library, machine facts, reports.

Import this module before jax: it sets two environment defaults that must precede the
first `import jax` / library import (see below). torch and denoising-diffusion-pytorch are
imported only on demand, so a JAX-only run needs neither. Nothing here imports grain, TFDS,
rasterio, tensorboardX or Orbax: the benchmarks run on a bare GPU machine with synthetic data.
"""

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import os
import platform
import resource
import shlex
import sys
import time
from typing import Any, Callable, Sequence

# JAX would otherwise take 75% of the GPU's memory at start, leaving torch (run in the same
# process for the comparison) too little at large batches; growth-on-demand costs nothing
# measurable once the step is warm.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
# The library's samplers wrap their loops in tqdm; bars would flood the benchmark logs.
os.environ.setdefault('TQDM_DISABLE', '1')

import numpy as np  # pylint: disable=g-import-not-at-top

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/ and eo_ddpm_jax/ are imported from the checkout, whatever the working directory.
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from eo_ddpm_jax import host_memory  # pylint: disable=g-import-not-at-top

# BENCH_KEEP_FREED_MEMORY=1 does what main.py's train.cpu_keep_freed_memory=True does on a
# CPU-only host (XLA:CPU reuses its freed buffers instead of faulting in fresh pages every
# step); off by default, as in main.py. Here, before any backend or torch thread allocates.
HOST_MALLOC = 'the C library\'s defaults'
if os.environ.get('BENCH_KEEP_FREED_MEMORY') == '1' and host_memory.keep_freed_memory():
  HOST_MALLOC = 'freed memory kept for reuse (eo_ddpm_jax.host_memory; torch runs under it too)'

DEFAULT_RESULTS = os.path.join(REPO_ROOT, 'bench', 'RESULTS.md')
RESULTS_HEADER = '# eo_ddpm_jax benchmark results\n'

# Dense bf16 tensor-core peaks (TFLOP/s) of the cards this project is lent, by a substring
# of `jax.devices()[0].device_kind`. MFU is reported against these in both precisions.
PEAK_BF16_TFLOPS = {
    'H100': 989.0,  # H100 SXM5 datasheet, dense (no sparsity).
    'H200': 989.0,  # Same GH100 compute as the H100 SXM.
    'A100': 312.0,  # A100 SXM datasheet, dense.
}
# Their memory bandwidths (TB/s, datasheets), for bench/roofline.py, bench/gpu_compile.py
# and bench/profile.py.
HBM_BANDWIDTH_TBS = {'H100': 3.35, 'H200': 4.8, 'A100': 2.039}  # A100: SXM, 80 GB.

# The study's run, for the projected training time: 11 epochs of 45,753 patches.
STUDY_EPOCHS = 11
STUDY_DATASET_SIZE = 45_753
STUDY_BATCH = 8


def add_model_flags(parser: argparse.ArgumentParser) -> None:
  """Flags shared by both benchmarks: architecture, diffusion, precision, comparison, report."""
  parser.add_argument('--dim', type=int, default=64, help='U-Net base width.')
  parser.add_argument('--dim_mults', type=str, default='1,2,4',
                      help='Comma-separated width multipliers, one per resolution stage.')
  parser.add_argument('--image_size', type=int, default=128, help='Square image side, px.')
  parser.add_argument('--channels', type=int, default=3)
  parser.add_argument('--attn_heads', type=int, default=4,
                      help='Attention heads per stage (the library default, 4).')
  parser.add_argument('--attn_dim_head', type=int, default=32,
                      help='Attention head width (the library default, 32).')
  parser.add_argument('--precision', choices=('float32', 'bfloat16'), default='float32',
                      help='JAX: the U-Net compute dtype (params stay float32). torch: '
                           'bfloat16 runs the forward under torch.autocast(bfloat16).')
  parser.add_argument('--attention_impl', choices=('auto', 'einsum', 'cudnn'),
                      default='auto', help='JAX full attention kernel (model.attention_impl).')
  parser.add_argument('--linear_attention_impl', default='auto',
                      choices=('auto', 'xla', 'triton', 'triton_interpret'),
                      help='JAX linear attention kernels (model.linear_attention_impl; '
                           'auto: triton for bfloat16 on an A100, H100 or H200, else xla).')
  parser.add_argument('--linear_attention_tilings', default='',
                      help='With the Triton kernels: NAME=ELEMENTS/WARPS/STAGES,... to '
                           'replace entries of fused_linear_attention.tilings() (as written by '
                           'bench/linear_attention_kernels.py --best_to).')
  parser.add_argument('--timesteps', type=int, default=500, help='Diffusion steps T.')
  parser.add_argument('--schedule', default='sigmoid', help='Beta schedule name.')
  parser.add_argument('--objective', default='pred_noise')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--compare-torch', dest='compare_torch', action='store_true',
                      help='Also time denoising-diffusion-pytorch 1.10.12 on the same device.')
  parser.add_argument('--torch_threads', type=int, default=0,
                      help='torch.set_num_threads(n) for the CPU comparison; 0 keeps torch\'s '
                           'default.')
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help='Device peak for MFU; default: by device kind (bf16 dense), none '
                           'on CPU.')
  add_report_flags(parser)


def add_report_flags(parser: argparse.ArgumentParser) -> None:
  """--results and --note, for every benchmark's `report`."""
  parser.add_argument('--results', default=DEFAULT_RESULTS,
                      help='Markdown file the table is appended to; "" prints only.')
  parser.add_argument('--note', default='', help='Free text added under the table.')


def parse_dim_mults(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.replace('(', '').replace(')', '').split(',') if v.strip())


def describe_unet(args: argparse.Namespace) -> str:
  """'U-Net dim=.., dim_mults=(..), attention HxD' for the tables' headings."""
  return (f'U-Net dim={args.dim}, dim_mults=({args.dim_mults}), attention '
          f'{args.attn_heads}x{args.attn_dim_head}')


def study_config(args: argparse.Namespace, batch_size: int):
  """configs/default.py with the benchmark's architecture, size, precision and diffusion.
  It starts nothing: the caller then sets the devices and tilings (`start_jax_devices`,
  or `set_linear_attention_tilings` alone where the CPU device count does not apply)."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.dim = args.dim
  config.model.dim_mults = parse_dim_mults(args.dim_mults)
  config.model.channels = args.channels
  config.model.attn_heads = args.attn_heads
  config.model.attn_dim_head = args.attn_dim_head
  config.model.dtype = args.precision
  config.model.attention_impl = args.attention_impl
  config.model.linear_attention_impl = args.linear_attention_impl
  config.data.image_size = args.image_size
  config.diffusion.timesteps = args.timesteps
  config.diffusion.schedule = args.schedule
  config.diffusion.objective = args.objective
  config.train.batch_size = batch_size
  config.seed = args.seed
  return config


def start_jax_devices(args: argparse.Namespace, config) -> None:
  """Sets JAX's CPU device count (`--cpu_devices`, as main.py's train.cpu_devices), then
  the kernel tilings (`--linear_attention_tilings`), in that order: taking the tilings
  may start JAX's backend, after which the count can no longer change."""
  from eo_ddpm_jax import cpu_devices  # pylint: disable=g-import-not-at-top
  config.train.cpu_devices = args.cpu_devices
  cpu_devices.configure(config.train)
  set_linear_attention_tilings(args.linear_attention_tilings)


def set_linear_attention_tilings(text: str) -> None:
  """Replaces entries of the target GPU's tilings (fused_linear_attention.tilings()) from
  'NAME=ELEMENTS/WARPS/STAGES,...' (STAGES 0: Triton's default); '' keeps the defaults.
  For this process's benchmark only. Starts JAX's backend when given tilings (the table
  depends on the GPU), so call it after `cpu_devices.configure`."""
  from eo_ddpm_jax import fused_linear_attention as fused  # pylint: disable=g-import-not-at-top
  for item in filter(None, text.split(',')):
    name, _, value = item.partition('=')
    table = fused.tilings()
    if name not in table:
      raise SystemExit(f'--linear_attention_tilings: unknown kernel {name!r}; one of '
                       f'{sorted(table)}.')
    try:
      elements, warps, stages = (int(v) for v in value.split('/'))
    except ValueError:
      raise SystemExit(f'--linear_attention_tilings: {item!r} is not '
                       'NAME=ELEMENTS/WARPS/STAGES (integers; STAGES 0 for the '
                       'default).') from None
    table[name] = fused.Tiling(elements, warps, stages or None)


def make_schedule(diffusion_config, timesteps: int | None = None):
  """The config's float64 `Schedule`, optionally with another T (for shortened runs)."""
  from eo_ddpm_jax import schedules  # pylint: disable=g-import-not-at-top
  name = diffusion_config.schedule
  params = {}
  if name == 'cosine':
    params = dict(s=diffusion_config.cosine_s)
  elif name == 'sigmoid':
    params = dict(start=diffusion_config.sigmoid_start, end=diffusion_config.sigmoid_end,
                  tau=diffusion_config.sigmoid_tau)
  return schedules.make_schedule(name, timesteps or diffusion_config.timesteps, **params)


# --------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
  """Seconds per unit (step or sample run) over repeated timed blocks."""
  seconds: list[float]

  @property
  def median(self) -> float:
    return float(np.median(self.seconds))

  @property
  def spread(self) -> str:
    """min-max and, from 4 repeats on, the interquartile range."""
    lo, hi = min(self.seconds), max(self.seconds)
    text = f'{_fmt_s(lo)}–{_fmt_s(hi)}'
    if len(self.seconds) >= 4:
      q1, q3 = np.percentile(self.seconds, [25, 75])
      text += f' (IQR {_fmt_s(q1)}–{_fmt_s(q3)})'
    return text


def _fmt_s(seconds: float) -> str:
  if seconds >= 1:
    return f'{seconds:.3g} s'
  return f'{seconds * 1e3:.3g} ms'


def time_blocks(run_block: Callable[[], None], repeats: int, units_per_block: int) -> Timing:
  """Times `repeats` calls of `run_block`, which must do `units_per_block` units and sync.

  Returns seconds per unit of each block, so the median is robust to a slow outlier block
  while each block still amortises the per-call sync.
  """
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    run_block()
    seconds.append((time.perf_counter() - start) / units_per_block)
  return Timing(seconds)


# --------------------------------------------------------------------------- machine


def jax_device_facts() -> dict[str, str]:
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return dict(platform=device.platform, kind=device.device_kind,
              count=str(jax.device_count()))


def machine_line() -> str:
  """uname, cores, the JAX device and, where present, torch's CUDA device."""
  uname = platform.uname()
  facts = jax_device_facts()
  line = (f'{uname.system} {uname.release} {uname.machine}, nproc {os.cpu_count()}, '
          f'JAX device {facts["platform"]}: {facts["kind"]} x{facts["count"]}')
  # Other processes sharing the cores distort CPU timings; record how busy it was.
  line += ', load average %.1f/%.1f/%.1f' % os.getloadavg()
  if 'torch' in sys.modules:
    torch = sys.modules['torch']
    if torch.cuda.is_available():
      line += f', torch CUDA device: {torch.cuda.get_device_name(0)}'
  return line


def versions_line() -> str:
  parts = [f'Python {platform.python_version()}']
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'denoising_diffusion_pytorch'):
    module = sys.modules.get(name)
    if module is None and name in ('jax', 'jaxlib', 'flax', 'optax'):
      module = importlib.import_module(name)
    if module is not None:
      version = getattr(module, '__version__', None)
      if version is None and name == 'denoising_diffusion_pytorch':
        version = importlib.import_module('denoising_diffusion_pytorch.version').__version__
      parts.append(f'{name} {version}')
  return ', '.join(parts)


def card_figure(table: dict[str, float], device_kind: str,
                platform_name: str) -> float | None:
  """`table`'s figure (PEAK_BF16_TFLOPS, HBM_BANDWIDTH_TBS) for the card named in
  `device_kind` ('NVIDIA H100 80GB HBM3'); None on a CPU or an unlisted card."""
  if platform_name == 'cpu':
    return None
  return next((value for card, value in table.items()
               if card.lower() in device_kind.lower()), None)


def default_peak_tflops(device_kind: str, platform_name: str) -> float | None:
  return card_figure(PEAK_BF16_TFLOPS, device_kind, platform_name)


def host_maxrss_bytes() -> int:
  # Linux reports ru_maxrss in KiB; it is the whole process's high-water mark.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def jax_peak_memory() -> tuple[int | None, str]:
  """(bytes, what they are): the allocator's peak on an accelerator, else host maxrss."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'], 'device peak_bytes_in_use'
  return host_maxrss_bytes(), 'process maxrss'


def format_bytes(n: int | None) -> str:
  if n is None:
    return 'n/a'
  return f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.0f} MiB'


def format_flops(n: float | None) -> str:
  if n is None:
    return 'n/a'
  return f'{n / 1e9:.1f} GFLOP'


def cpu_model_flops(fn: Callable, *args) -> float | None:
  """FLOPs of `fn(*args)` from XLA's cost analysis of its un-optimised HLO, on the CPU.

  The model's FLOPs, whatever device runs it: on GPUs the PJRT plugin offers no analysis
  of lowered HLO, and the compiled program's analysis leaves out the convolutions (cuDNN
  custom calls), so it under-counts ~20x. Lowering for the host CPU counts every conv and
  dot (within 2% of torch.utils.flop_counter, bench/RESULTS.md). `fn` must not use
  GPU-only kernels (build it with attention_impl='einsum'); args may be arrays or
  ShapeDtypeStructs.
  """
  import jax  # pylint: disable=g-import-not-at-top
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu),
                          args)
  return flops_from_cost_analysis(jax.jit(fn).lower(*abstract))


def flops_from_cost_analysis(compiled) -> float | None:
  """XLA's FLOP count of a compiled computation; None where the backend gives none."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None  # Best-effort API: unimplemented on some backends.
  # Older JAX returned one dict per device program in a list.
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops'])


# --------------------------------------------------------------------------- torch


def load_torch_library():
  """Returns (the library's `denoising_diffusion_pytorch` module, ema_pytorch.EMA).

  Where torchvision imports (GPU machines) the library is imported as it is. Where PyPI's
  torchvision does not load beside CPU torch, the tests' stand-in torchvision is used
  (the U-Net, GaussianDiffusion and EMA never call torchvision).
  """
  try:
    library = importlib.import_module('denoising_diffusion_pytorch.denoising_diffusion_pytorch')
  except (ImportError, RuntimeError, OSError) as error:
    missing = getattr(error, 'name', None)
    if missing and not missing.startswith('torchvision'):
      raise ImportError(
          f'denoising-diffusion-pytorch needs {missing!r}: install or carry it '
          f'(pip install {missing}) for --compare-torch') from error
    # Drop what the failed import left half-initialised before retrying with the stand-in.
    for name in list(sys.modules):
      if name.split('.')[0] in ('torchvision', 'denoising_diffusion_pytorch', 'pytorch_fid'):
        del sys.modules[name]
    from tests import torch_oracle  # pylint: disable=g-import-not-at-top
    library = torch_oracle.load_ddpm_library()
  ema_pytorch = importlib.import_module('ema_pytorch')
  return library, ema_pytorch.EMA


def torch_setup(args: argparse.Namespace):
  """Imports torch, applies --torch_threads; returns (torch, device, threads description)."""
  import torch  # pylint: disable=g-import-not-at-top
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  if args.torch_threads > 0:
    torch.set_num_threads(args.torch_threads)
  threads = (f'{torch.get_num_threads()} threads'
             + ('' if args.torch_threads > 0 else ' (default)'))
  return torch, device, threads


def torch_sync(torch, device) -> None:
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def torch_autocast(torch, device, precision: str):
  """The mixed-precision context: bf16 autocast (the Trainer's amp uses fp16 + scaler)."""
  if precision == 'bfloat16':
    return torch.autocast(device.type, dtype=torch.bfloat16)
  return contextlib.nullcontext()


def build_torch_diffusion(library, args: argparse.Namespace, device, *,
                          timesteps: int | None = None, sampling_timesteps: int | None = None):
  """The library's GaussianDiffusion(Unet(...)) with the benchmark's architecture."""
  unet = library.Unet(dim=args.dim, dim_mults=parse_dim_mults(args.dim_mults),
                      channels=args.channels, attn_heads=args.attn_heads,
                      attn_dim_head=args.attn_dim_head)
  model = library.GaussianDiffusion(
      unet, image_size=args.image_size, timesteps=timesteps or args.timesteps,
      sampling_timesteps=sampling_timesteps, objective=args.objective,
      beta_schedule=args.schedule)
  return model.to(device)


def torch_peak_memory(torch, device) -> tuple[int, str]:
  if device.type == 'cuda':
    return torch.cuda.max_memory_allocated(device), 'torch.cuda.max_memory_allocated'
  return host_maxrss_bytes(), 'process maxrss (cumulative, JAX run included)'


# --------------------------------------------------------------------------- reports


def command_line() -> str:
  """The exact command, with the XLA/thread environment that changes the numbers."""
  env = [f'{k}={shlex.quote(os.environ[k])}'
         for k in ('XLA_FLAGS', 'OMP_NUM_THREADS', 'BENCH_SMOKE') if os.environ.get(k)]
  module = os.path.splitext(os.path.relpath(sys.argv[0], REPO_ROOT))[0].replace(os.sep, '.')
  return ' '.join(env + ['python -m', module] + [shlex.quote(a) for a in sys.argv[1:]])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def report(title: str, table: str, notes: Sequence[str], results_path: str) -> str:
  """Prints the section and appends it to `results_path` (created with a header)."""
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  section = '\n'.join([
      f'\n## {title} ({stamp})', '',
      f'- Machine: {machine_line()}',
      f'- Versions: {versions_line()}',
      f'- Command: `{command_line()}`',
      f'- Host malloc: {HOST_MALLOC}.',
      *[f'- {note}' for note in notes if note],
      '', table, ''])
  print(section, flush=True)
  if results_path:
    new = not os.path.exists(results_path)
    with open(results_path, 'a', encoding='utf-8') as f:
      if new:
        f.write(RESULTS_HEADER)
      f.write(section)
  return section
