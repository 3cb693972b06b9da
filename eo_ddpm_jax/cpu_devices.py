"""One JAX CPU device per core, so data parallelism uses every core of a CPU host.

XLA:CPU runs each convolution of a small batch on one thread: on a 2-core machine a
1-device train step leaves the second core idle (measured: a 3x3 conv's forward+backward
at 64x64x32, batch 8, runs 35 GFLOP/s on 1 or 2 cores). Split into N CPU devices, the
batch is sharded over the mesh like on N GPUs and each device runs on its own core
(77 GFLOP/s on 2 devices; bench/RESULTS.md). This must be set before JAX starts its
backend, so main.py calls `configure` first.
"""

import os

from absl import logging
import jax

# XLA's own flag for the same thing: a user who sets it keeps their choice.
_XLA_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


def available_cores() -> int:
  """Cores this process may run on (its CPU affinity, e.g. a container's share)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS has no affinity API.
    return os.cpu_count() or 1


def choose_count(requested: int, cores: int, batch_size: int) -> int:
  """The number of CPU devices to create.

  Args:
    requested: `train.cpu_devices`: a count >= 1, or 0 for one per core.
    cores: the cores available (>= 1).
    batch_size: the per-process batch per step (the train batch over the number of
      processes and grad_accum_steps); each device must get a whole share.

  Returns:
    `requested` if >= 1, else the largest count <= cores that divides batch_size.
  """
  if requested >= 1:
    return requested
  return max(n for n in range(1, max(cores, 1) + 1) if batch_size % n == 0)


def configure(train_config) -> int | None:
  """Sets JAX's CPU device count from `train.cpu_devices` before the backend starts.

  Leaves JAX alone when XLA_FLAGS already sets the count, when `jax_num_cpu_devices` is
  already set, or when `train.cpu_devices` is 1. Harmless on GPU/TPU hosts: only the
  CPU client, which the model does not run on there, gets the extra devices.

  Args:
    train_config: the config's `train` group (cpu_devices, batch_size,
      grad_accum_steps, num_processes).

  Returns:
    The count set, or None when JAX was left alone.
  """
  if _XLA_DEVICE_COUNT_FLAG in os.environ.get('XLA_FLAGS', ''):
    return None
  if jax.config.jax_num_cpu_devices > 0:
    return None
  processes = max(train_config.num_processes, 1)
  per_process = train_config.batch_size // (processes * train_config.grad_accum_steps)
  requested = train_config.get('cpu_devices', 0)  # Configs written before it: 0.
  count = choose_count(requested, available_cores(), max(per_process, 1))
  if count == 1:
    return None
  jax.config.update('jax_num_cpu_devices', count)
  logging.info('JAX CPU backend: %d devices (train.cpu_devices=%d, %d cores); the model '
               'runs on them when the host has no GPU or TPU.', count,
               requested, available_cores())
  return count
