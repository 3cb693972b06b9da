"""Keep freed host memory in the process, so XLA:CPU reuses it instead of faulting it in.

On the CPU backend every call of a compiled program gets its temporary buffers from
malloc: ~680 MiB per train step of the bench's model (dim 32, 64x64, batch 8). glibc
serves blocks above 32 MiB with a fresh mmap and unmaps them when freed, so each step
touches new pages: 174,000 page faults per step here, each one a kernel entry and a
zeroed 4 KiB page. With mmap off and one malloc arena, freed blocks go back to malloc's
heap, which is not trimmed, and the next step reuses them: 0 faults, and the train step
~10% faster on the 2-core VM (bench/RESULTS.md). The costs: the heap keeps its
high-water mark (peak RSS 2.5-3.1 GiB against 2.0 GiB in that bench), and all threads
share one arena: the demo (batch 6, 32x32, with the tf.data pipeline) trained 2.3x fewer
steps in its first 150 s and took 1.3x as long end to end. So it is opt-in
(`train.cpu_keep_freed_memory`, `BENCH_KEEP_FREED_MEMORY=1`).

Only glibc has these knobs (`mallopt`); elsewhere nothing changes. Call before JAX
starts its backend: the one-arena limit binds threads that have not allocated yet.
"""

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import pkgutil

from absl import logging

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# The largest value mallopt takes (an int): the heap is trimmed only when this much is
# free at its top, i.e. in practice never.
_NEVER_TRIM = 2**31 - 1

# Accelerator backends that JAX loads as separate packages besides its jax_plugins.
_ACCELERATOR_PACKAGES = ('libtpu', 'jax_cuda12_plugin', 'jax_cuda13_plugin')


def jax_runs_on_cpu() -> bool:
  """True when JAX's first backend will be the CPU: JAX_PLATFORMS starts with 'cpu', or
  no accelerator plugin (CUDA, ROCm, TPU, any jax_plugins entry) is installed. Does not
  start a backend."""
  platforms = os.environ.get('JAX_PLATFORMS', '') or os.environ.get('JAX_PLATFORM_NAME', '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  if any(importlib.util.find_spec(name) for name in _ACCELERATOR_PACKAGES):
    return False
  if importlib.metadata.entry_points(group='jax_plugins'):
    return False
  namespace = importlib.util.find_spec('jax_plugins')
  return not (namespace and list(pkgutil.iter_modules(namespace.submodule_search_locations)))


def keep_freed_memory() -> bool:
  """On a host where JAX runs on the CPU, makes glibc malloc keep freed memory for reuse
  (no mmap, one arena, no trimming). GPU/TPU hosts are left alone.

  Returns:
    True if set; False on an accelerator host, or where the C library has no mallopt
    (macOS, musl) or refused.
  """
  if not jax_runs_on_cpu():
    return False
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library('c')).mallopt
  except (OSError, AttributeError, TypeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  ok = all(mallopt(option, value) == 1 for option, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))
  if ok:
    logging.info('malloc keeps freed memory (no mmap, one arena, no trim): XLA:CPU reuses '
                 'its buffers between steps instead of faulting in new pages.')
  return ok
