"""Training logs: TensorBoard events (tensorboardX) and `metrics.jsonl`, first host only.

A resumed run rewrites history from its restored step: TensorBoard events after it
are purged and `metrics.jsonl` lines after it dropped, so every step appears once.
"""

import json
import os

import jax
import numpy as np
import tensorboardX

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_SUBDIR = 'tensorboard'


class MetricWriter:
  """Writes scalars and images per step; a no-op on hosts other than the first."""

  def __init__(self, workdir: str, resume_step: int = 0):
    """Opens the writers under `workdir`; drops records of steps > resume_step."""
    self._enabled = jax.process_index() == 0
    if not self._enabled:
      return
    self._jsonl_path = os.path.join(workdir, METRICS_FILE)
    _truncate_jsonl(self._jsonl_path, resume_step)
    self._jsonl = open(self._jsonl_path, 'a')
    # purge_step hides events at steps >= it that an interrupted run left behind.
    self._tb = tensorboardX.SummaryWriter(
        os.path.join(workdir, TENSORBOARD_SUBDIR),
        purge_step=resume_step + 1 if resume_step > 0 else None)

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    """One record per step: TensorBoard scalars and a metrics.jsonl line."""
    if not self._enabled:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()  # Readable while the run goes on; one small write per step.

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """uint8 [H, W, C] image into TensorBoard."""
    if self._enabled:
      self._tb.add_image(name, image, step, dataformats='HWC')

  def flush(self) -> None:
    if self._enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tb.close()


def _truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps only the lines of steps <= last_step (a no-op when the file is absent)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      if json.loads(line)['step'] <= last_step:
        kept.append(line)
    except (ValueError, KeyError):
      pass  # A line cut off by a kill.
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(kept)
  os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """The records of `<workdir>/metrics.jsonl`, in file order."""
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]
