"""Helpers of the tests that run the command line in subprocesses."""

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(cache_dir) -> dict[str, str]:
  """The environment of CLI runs: the repo on the path, CPU JAX and a compilation cache
  shared by the runs (identical programs compile once, to the same binary)."""
  return {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu',
          'JAX_COMPILATION_CACHE_DIR': str(cache_dir),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


def build_synthetic_dataset(base, env, num_patches: int) -> str:
  """Writes 2 synthetic scenes of num_patches / 2 patches under `base`/raw and builds them
  with the tfds_sen12ms builder (the real TFDS path); returns the data_dir."""
  for module, args in (
      ('tfds_sen12ms.synthetic', ['--out_dir', str(base / 'raw'), '--num_scenes=2',
                                  f'--patches_per_scene={num_patches // 2}']),
      ('tfds_sen12ms.build', ['--manual_dir', str(base / 'raw'), '--data_dir',
                              str(base / 'tfds'), '--config=summer_rgb', '--num_workers=1'])):
    subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=env, check=True,
                   capture_output=True)
  return str(base / 'tfds')


def run_script_on_cpu_devices(script: str, num_devices: int, out_path) -> dict:
  """Runs the Python `script` in a fresh process with `num_devices` JAX CPU devices, the
  repo on the path and `out_path` as its argument; returns the JSON it wrote there."""
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={num_devices}'}
  result = subprocess.run([sys.executable, '-c', script, str(out_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out_path) as f:
    return json.load(f)


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    return sock.getsockname()[1]


def run_two_hosts(command: list[str], env: dict[str, str]) -> None:
  """Runs the CLI `command` as two processes ("hosts", 2 CPU devices each, jax.distributed
  over gloo on localhost) and waits for both; each must exit 0."""
  flags = ['--config.train.distributed=True',
           f'--config.train.coordinator_address=localhost:{free_port()}',
           '--config.train.num_processes=2']
  run_env = {**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  hosts = [subprocess.Popen([*command, *flags, f'--config.train.process_id={i}'], cwd=ROOT,
                            env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  for host in hosts:
    _, stderr = host.communicate(timeout=600)
    assert host.returncode == 0, stderr[-5000:]
