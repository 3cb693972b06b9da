"""`--mode=report`: figures, report.md and report.html comparing runs (e.g. schedules).

Reads, from each run directory: `config.json` (its schedule; written by training),
`metrics.jsonl` (the loss per step), `samples/epoch_<NNN>.png` (the EMA sample grid
after each epoch; the eval grids `samples/eval_samples_<step>.png` when there are none)
and `eval.json` (written by `--mode=evaluate`). Writes into one output folder:
- schedules.png: abar_t and log-SNR_t of every run's schedule;
- loss.png: the training losses on a log scale, smoothed like TensorBoard (a debiased
  exponential moving average of weight `report.loss_smoothing`) over the raw curves;
- samples_<run>.png: the grids after epoch 1 and the last epoch beside real patches
  (read through the input pipeline with the report's config: `data`, `eval.split`);
- metrics.png: FID, KID and EO statistics per epoch with their real-vs-real floors;
- report.md and report.html (the same text, tables and figures; the HTML has no
  external assets besides these PNGs, which lie next to it).
A run is named by its schedule, or by its folder when runs share a schedule.
"""

import dataclasses
import html
import os
import re
from typing import Any

from absl import logging
import matplotlib
matplotlib.use('Agg')  # Files only: no display needed (and none on servers).
# pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
from PIL import Image

from eo_ddpm_jax import config_check
from eo_ddpm_jax import evaluate
from eo_ddpm_jax import metric_writer
from eo_ddpm_jax import run_config
from eo_ddpm_jax import sampling
from eo_ddpm_jax import train
from eo_ddpm_jax import train_step as train_step_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

REPORT_MD = 'report.md'
REPORT_HTML = 'report.html'
MISSING = '–'  # Shown for a metric that was not computed.
_EPOCH_GRID = re.compile(r'epoch_(\d+)\.png$')
# Columns of the metrics table: (header, metric name in eval.json, floor name or None).
_BANDS = ('R', 'G', 'B')
_TABLE_COLUMNS = (
    [('FID', 'fid', 'fid_floor'), ('KID', 'kid_mean', 'kid_floor_mean')]
    + [(f'W1 {b}', f'w1_{b}', f'w1_{b}_floor') for b in _BANDS]
    + [('Δmean', 'mean_diff', 'mean_diff_floor'), ('Δstd', 'std_diff', 'std_diff_floor'),
       ('RAPS', 'raps_log10_mad', 'raps_log10_mad_floor')])
# Panels of metrics.png: (title, metric name).
_METRIC_PANELS = (('FID', 'fid'), ('KID', 'kid_mean'), ('W1, mean of R, G, B', 'w1'),
                  ('RAPS log10 distance', 'raps_log10_mad'))


@dataclasses.dataclass
class Run:
  """What the report reads from one run directory."""
  workdir: str
  name: str
  config: ml_collections.ConfigDict | None
  loss_steps: np.ndarray  # int [L]; empty when there is no metrics.jsonl.
  losses: np.ndarray  # float [L].
  grids: dict[int, str]  # epoch -> grid PNG path.
  evals: list[dict[str, Any]]  # eval.json entries, steps ascending.


# --- Math.

def smooth_tensorboard(values, weight: float) -> np.ndarray:
  """TensorBoard's scalar smoothing: an exponential moving average, debiased.

  s_n = (1 - w) sum_{k<=n} w^(n-k) x_k / (1 - w^n) over the finite values so far
  (the debiasing divides out the weight the zero start leaves missing). Non-finite
  values are passed through and skipped, as TensorBoard does.

  Args:
    values: float [L]. weight: w in [0, 1); 0 returns the values.
  Returns:
    float64 [L].
  """
  if not 0 <= weight < 1:
    raise ValueError(f'the smoothing weight must be in [0, 1), got {weight}')
  values = np.asarray(values, np.float64)
  smoothed = np.empty_like(values)
  last, count = 0.0, 0
  for i, value in enumerate(values):
    if not np.isfinite(value):
      smoothed[i] = value
      continue
    last = last * weight + (1 - weight) * value
    count += 1
    smoothed[i] = last / (1 - weight ** count)
  return smoothed


def _band_mean(metrics: dict[str, Any], name: str, suffix: str = '') -> float | None:
  values = [metrics.get(f'{name}_{b}{suffix}') for b in _BANDS]
  return None if any(v is None for v in values) else float(np.mean(values))


def metric_value(metrics: dict[str, Any], name: str) -> float | None:
  """A metric of an eval.json entry, or None; mean_diff, std_diff, w1 (+ _floor): band means."""
  floor = name.endswith('_floor')
  base = name[:-len('_floor')] if floor else name
  if base in ('mean_diff', 'std_diff', 'w1'):
    return _band_mean(metrics, base, '_floor' if floor else '')
  value = metrics.get(name)
  return None if value is None else float(value)


def floor_name(name: str) -> str:
  """The eval.json name of a metric's real-vs-real floor."""
  return 'kid_floor_mean' if name == 'kid_mean' else f'{name}_floor'


def format_value(value: float | None) -> str:
  """4 significant digits, or MISSING."""
  return MISSING if value is None else f'{value:.4g}'


# --- Reading the runs.

def _run_names(workdirs: list[str], configs: list) -> list[str]:
  """Schedule names, or the folder where a schedule repeats or is unknown."""
  schedules = [c.diffusion.schedule if c is not None else None for c in configs]
  names = []
  for workdir, schedule in zip(workdirs, schedules):
    folder = os.path.basename(os.path.normpath(workdir))
    if schedule is None:
      names.append(folder)
    elif schedules.count(schedule) > 1:
      names.append(f'{schedule} ({folder})')
    else:
      names.append(schedule)
  return names


def _grids(workdir: str, evals: list[dict[str, Any]]) -> dict[int, str]:
  """epoch -> sample grid: training's per-epoch grids, else the eval grids."""
  samples_dir = os.path.join(workdir, train.SAMPLES_SUBDIR)
  grids = {}
  if os.path.isdir(samples_dir):
    for name in os.listdir(samples_dir):
      match = _EPOCH_GRID.fullmatch(name)
      if match:
        grids[int(match.group(1))] = os.path.join(samples_dir, name)
  if not grids:
    for entry in evals:
      path = os.path.join(workdir, entry.get('grid', ''))
      if isinstance(entry.get('epoch'), int) and os.path.isfile(path):
        grids[entry['epoch']] = path
  return dict(sorted(grids.items()))


def read_runs(workdirs: list[str]) -> list[Run]:
  """The runs' saved configs, losses, grids and evaluations.

  Raises:
    FileNotFoundError: a run directory does not exist.
  """
  for workdir in workdirs:
    if not os.path.isdir(workdir):
      raise FileNotFoundError(f'Run directory {workdir} does not exist; pass existing '
                              'ones with --report_workdirs=DIR1,DIR2,...')
  configs = [run_config.load_config(w) for w in workdirs]
  runs = []
  for workdir, name, config in zip(workdirs, _run_names(workdirs, configs), configs):
    steps, losses = [], []
    if os.path.exists(os.path.join(workdir, metric_writer.METRICS_FILE)):
      for record in metric_writer.read_metrics(workdir):
        if 'loss' in record:
          steps.append(record['step'])
          losses.append(record['loss'])
    evals = sorted(evaluate.read_eval_json(workdir).values(), key=lambda e: e['step'])
    runs.append(Run(workdir=workdir, name=name, config=config,
                    loss_steps=np.asarray(steps, np.int64),
                    losses=np.asarray(losses, np.float64),
                    grids=_grids(workdir, evals), evals=evals))
  return runs


# --- Figures.

def _save(fig, path: str, dpi: int) -> str:
  fig.savefig(path, dpi=dpi, bbox_inches='tight')
  plt.close(fig)
  return os.path.basename(path)


def run_schedule(run: Run):
  """The run's Schedule from its saved config, or None (no config, or it does not build)."""
  if run.config is None:
    return None
  try:
    return train_step_lib.create_schedule(run.config.diffusion)
  except (ValueError, KeyError, AttributeError, OSError) as e:
    logging.warning('The schedule of %s is not drawn: %s', run.workdir, e)
    return None


def plot_schedules(runs: list[Run], path: str, dpi: int) -> str | None:
  """abar_t and log-SNR_t per run with a saved config; None when no run has one."""
  runs = [(run, run_schedule(run)) for run in runs]
  runs = [(run, schedule) for run, schedule in runs if schedule is not None]
  if not runs:
    return None
  fig, (ax_abar, ax_snr) = plt.subplots(1, 2, figsize=(11, 4))
  for run, schedule in runs:
    t = np.arange(schedule.num_timesteps)
    ax_abar.plot(t, schedule.alphas_cumprod, label=run.name)
    with np.errstate(divide='ignore'):  # abar = 0 at t = T - 1 is -inf: not drawn.
      log_snr = np.log(schedule.snr)
    ax_snr.plot(t[np.isfinite(log_snr)], log_snr[np.isfinite(log_snr)], label=run.name)
  ax_abar.set(xlabel='timestep t', ylabel=r'$\bar\alpha_t$', title='signal kept')
  ax_snr.set(xlabel='timestep t',
             ylabel=r'log SNR = log($\bar\alpha_t$ / (1 - $\bar\alpha_t$))',
             title='log signal-to-noise ratio')
  for ax in (ax_abar, ax_snr):
    ax.grid(alpha=0.3)
    ax.legend()
  return _save(fig, path, dpi)


def plot_losses(runs: list[Run], path: str, weight: float, raw_alpha: float,
                dpi: int) -> str | None:
  """All runs' losses on one log-scale plot: raw, faint, under the smoothed curve."""
  runs = [r for r in runs if r.losses.size]
  if not runs:
    return None
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for i, run in enumerate(runs):
    color = f'C{i}'
    ax.plot(run.loss_steps, run.losses, color=color, alpha=raw_alpha, linewidth=0.8)
    ax.plot(run.loss_steps, smooth_tensorboard(run.losses, weight), color=color,
            label=run.name)
  ax.set_yscale('log')
  ax.set(xlabel='step', ylabel='training loss',
         title=f'training loss (smoothing {weight:g})')
  ax.grid(alpha=0.3, which='both')
  ax.legend()
  return _save(fig, path, dpi)


def plot_samples(run: Run, reals_grid: np.ndarray | None, path: str, dpi: int) -> str | None:
  """Epoch 1 and the last epoch's grids beside the real patches; None without grids."""
  if not run.grids:
    return None
  epochs = sorted({min(run.grids), max(run.grids)})
  panels = [(f'{run.name}: epoch {e}', np.asarray(Image.open(run.grids[e]).convert('RGB')))
            for e in epochs]
  if reals_grid is not None:
    panels.append(('real patches', reals_grid))
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.3), squeeze=False)
  for ax, (title, image) in zip(axes[0], panels):
    ax.imshow(image, interpolation='nearest')
    ax.set_title(title)
    ax.axis('off')
  return _save(fig, path, dpi)


def plot_metrics(runs: list[Run], path: str, dpi: int) -> str | None:
  """Metrics per epoch (solid) and their floors (dashed); None without evaluations."""
  panels = [(title, name) for title, name in _METRIC_PANELS
            if any(metric_value(e['metrics'], name) is not None
                   for run in runs for e in run.evals)]
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
  for ax, (title, name) in zip(axes[0], panels):
    for i, run in enumerate(runs):
      points = [(e['epoch'], metric_value(e['metrics'], name)) for e in run.evals]
      points = [(x, y) for x, y in points if y is not None]
      if not points:
        continue
      ax.plot(*zip(*points), marker='o', color=f'C{i}', label=run.name)
      floor = metric_value(run.evals[-1]['metrics'], floor_name(name))
      if floor is not None:
        ax.axhline(floor, color=f'C{i}', linestyle='--', linewidth=0.8)
    ax.set(xlabel='epoch', title=title)
    ax.grid(alpha=0.3)
  # One legend for the figure: a run may be missing from some panels (no FID).
  labels = {}
  for ax in axes[0]:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      labels.setdefault(label, handle)
  fig.legend(list(labels.values()), list(labels), loc='lower center', ncol=len(labels),
             bbox_to_anchor=(0.5, 1.0))
  fig.tight_layout()
  return _save(fig, path, dpi)


def real_patches_grid(config: ml_collections.ConfigDict) -> tuple[np.ndarray | None, str]:
  """A grid of `report.num_real_grid` real patches, or (None, why not)."""
  try:
    reals = evaluate.load_real_patches(config, config.report.num_real_grid)
  except FileNotFoundError as e:
    logging.warning('No real patches in the report: %s', e)
    return None, (f'the dataset {config.data.dataset} could not be opened under '
                  f'data.data_dir={config.data.data_dir} (see the log)')
  return sampling.image_grid(reals), ''


# --- The document: blocks rendered both as Markdown and as HTML.

def _metrics_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
  """Header and rows: one row per run and evaluated epoch, then its real-vs-real floor."""
  header = ['Run', 'Epoch', 'Step', 'Sampler'] + [c[0] for c in _TABLE_COLUMNS]
  rows = []
  for run in runs:
    for entry in run.evals:
      rows.append([run.name, str(entry['epoch']), str(entry['step']),
                   f'{entry["sampler"]} {entry["steps"]}']
                  + [format_value(metric_value(entry['metrics'], c[1]))
                     for c in _TABLE_COLUMNS])
    if run.evals:
      last = run.evals[-1]['metrics']
      rows.append([f'{run.name}: real vs real', MISSING, MISSING, MISSING]
                  + [format_value(metric_value(last, c[2])) for c in _TABLE_COLUMNS])
  return header, rows


def _loss_summary(runs: list[Run], weight: float) -> str:
  finals = [(run.name, smooth_tensorboard(run.losses, weight)[-1], int(run.loss_steps[-1]))
            for run in runs if run.losses.size]
  if not finals:
    return 'No run has a metrics.jsonl, so there is no loss curve.'
  parts = ', '.join(f'{name} {value:.4g} (step {step})' for name, value, step in finals)
  best = min(finals, key=lambda f: f[1])
  return (f'Final smoothed loss: {parts}. Lowest: {best[0]}. The losses of different '
          'schedules weight the timesteps differently, so a lower loss is not by itself '
          'a better model; the sample metrics below compare the models.')


def _schedule_summary(runs: list[Run]) -> str:
  parts = []
  for run in runs:
    schedule = run_schedule(run)
    if schedule is None:
      parts.append(f'{run.name}: no config.json with a schedule, not drawn')
      continue
    half = schedule.num_timesteps // 2
    with np.errstate(divide='ignore'):
      snr = np.log(schedule.snr)
    parts.append(f'{run.name}: T = {schedule.num_timesteps}, abar at t = {half} is '
                 f'{schedule.alphas_cumprod[half]:.3g}, log-SNR from {snr[0]:.3g} to '
                 f'{snr[-1]:.3g}')
  return '; '.join(parts) + '.'


def _best(runs: list[Run], name: str) -> tuple[str, float, float | None] | None:
  """(run, value at its last evaluated epoch, floor) of the lowest metric, or None."""
  candidates = []
  for run in runs:
    if run.evals:
      value = metric_value(run.evals[-1]['metrics'], name)
      if value is not None:
        candidates.append((run.name, value,
                           metric_value(run.evals[-1]['metrics'], floor_name(name))))
  return min(candidates, key=lambda c: c[1]) if candidates else None


def _metrics_summary(runs: list[Run]) -> str:
  if not any(run.evals for run in runs):
    return ('No run has an eval.json: run --mode=evaluate on each run directory to fill '
            'this table.')
  sentences = []
  for title, name in (('FID', 'fid'), ('KID', 'kid_mean'), ('mean band W1', 'w1'),
                      ('RAPS distance', 'raps_log10_mad')):
    best = _best(runs, name)
    if best is not None:
      floor = f' (real-vs-real floor {format_value(best[2])})' if best[2] is not None else ''
      sentences.append(f'Lowest {title} at the last evaluated epoch: {best[0]}, '
                       f'{format_value(best[1])}{floor}.')
  if _best(runs, 'fid') is None:
    sentences.append(f'FID and KID were not computed (no eval.inception_weights), shown '
                     f'as {MISSING}.')
  return ' '.join(sentences)


def _blocks(config: ml_collections.ConfigDict, runs: list[Run], figures: dict[str, Any],
            reals_note: str) -> list[tuple]:
  """The report as ('h1'|'h2'|'p', text), ('img', file, alt) and ('table', header, rows)."""
  r = config.report
  names = ', '.join(f'{run.name} ({run.workdir})' for run in runs)
  blocks = [('h1', 'DDPM noise schedules on Sentinel-2 patches'),
            ('p', f'Runs: {names}.')]
  blocks.append(('h2', 'Noise schedules'))
  if figures['schedules']:
    blocks.append(('p', 'Left: the fraction of signal kept after t forward steps, abar_t; '
                        'right: the log signal-to-noise ratio log(abar_t / (1 - abar_t)). '
                        'Where a schedule keeps more signal at the same t, the model '
                        'spends more of its training steps on fine detail. '
                        + _schedule_summary(runs)))
    blocks.append(('img', figures['schedules'], 'abar and log-SNR per timestep'))
  else:
    blocks.append(('p', 'No run has a config.json (written by training), so the schedules '
                        'are not drawn.'))
  blocks.append(('h2', 'Training loss'))
  if figures['loss']:
    blocks.append(('p', 'The training loss (MSE of the objective) per step on a log scale: '
                        'faint, as logged; solid, smoothed as TensorBoard does (debiased '
                        f'exponential moving average, weight {r.loss_smoothing:g}). '
                        + _loss_summary(runs, r.loss_smoothing)))
    blocks.append(('img', figures['loss'], 'training loss curves'))
  else:
    blocks.append(('p', _loss_summary(runs, r.loss_smoothing)))
  blocks.append(('h2', 'Samples'))
  blocks.append(('p', 'Grids of EMA samples after the first and the last epoch of each run '
                      '(the grids training writes, samples/epoch_<NNN>.png), beside real '
                      'patches preprocessed as for training. '
                      + (f'No real patches are shown: {reals_note}.' if reals_note else '')))
  for run in runs:
    if figures['samples'].get(run.name):
      blocks.append(('img', figures['samples'][run.name], f'samples of {run.name}'))
    else:
      blocks.append(('p', f'{run.name}: no sample grids in {run.workdir}/samples.'))
  blocks.append(('h2', 'Sample quality'))
  blocks.append(('p', 'Per run and evaluated epoch (eval.json of --mode=evaluate): FID and '
                      'KID on Inception features; W1, the Wasserstein-1 distance between '
                      'sample and real pixel values per band; Δmean and Δstd, the absolute '
                      'differences of band mean and standard deviation (mean of R, G, B); '
                      'RAPS, the mean |log10| distance of the radially averaged power '
                      'spectra (texture, sharpness). Lower is better. The "real vs real" '
                      'rows are the floors: the same metric between two halves of the '
                      f'real patches, what sampling noise alone gives. {MISSING}: not '
                      'computed. ' + _metrics_summary(runs)))
  header, rows = _metrics_table(runs)
  if rows:
    blocks.append(('table', header, rows))
  if figures['metrics']:
    blocks.append(('p', 'The same metrics per epoch; dashed lines are the floors.'))
    blocks.append(('img', figures['metrics'], 'metrics per epoch'))
  return blocks


def render_markdown(blocks: list[tuple]) -> str:
  lines = []
  for block in blocks:
    kind = block[0]
    if kind in ('h1', 'h2'):
      lines += [('# ' if kind == 'h1' else '## ') + block[1], '']
    elif kind == 'p':
      lines += [block[1], '']
    elif kind == 'img':
      lines += [f'![{block[2]}]({block[1]})', '']
    elif kind == 'table':
      header, rows = block[1], block[2]
      lines.append('| ' + ' | '.join(header) + ' |')
      lines.append('|' + '|'.join(['---'] * len(header)) + '|')
      lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
      lines.append('')
  return '\n'.join(lines)


_HTML_STYLE = ('body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em;'
               'line-height:1.45}img{max-width:100%}table{border-collapse:collapse;'
               'font-size:90%}td,th{border:1px solid #bbb;padding:.25em .5em;'
               'text-align:right}td:first-child,th:first-child{text-align:left}')


def render_html(blocks: list[tuple]) -> str:
  """A standalone page: inline style, images by relative file name, nothing external."""
  esc = html.escape
  body = []
  for block in blocks:
    kind = block[0]
    if kind in ('h1', 'h2', 'p'):
      body.append(f'<{kind}>{esc(block[1])}</{kind}>')
    elif kind == 'img':
      body.append(f'<figure><img src="{esc(block[1])}" alt="{esc(block[2])}"></figure>')
    elif kind == 'table':
      head = ''.join(f'<th>{esc(h)}</th>' for h in block[1])
      rows = ''.join('<tr>' + ''.join(f'<td>{esc(c)}</td>' for c in row) + '</tr>'
                     for row in block[2])
      body.append(f'<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>')
  title = esc(blocks[0][1])
  return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}'
          f'</title><style>{_HTML_STYLE}</style></head><body>\n' + '\n'.join(body)
          + '\n</body></html>\n')


def _file_name(name: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('_')


def make_report(config: ml_collections.ConfigDict, workdirs: list[str], out_dir: str
                ) -> dict[str, str]:
  """Writes the figures, report.md and report.html into out_dir.

  Args:
    config: reads `report` and, for the real patches, `data`, `eval.split`, `seed`.
    workdirs: the run directories, in the order they are shown.
    out_dir: the report folder (created).
  Returns:
    {'md': path, 'html': path}.
  Raises:
    config_check.ConfigError: no run directories, or a bad `report` setting.
    FileNotFoundError: a run directory does not exist.
  """
  r = config.report
  if not workdirs:
    raise config_check.ConfigError(
        '--mode=report needs the runs to compare: --report_workdirs=DIR1,DIR2,... '
        '(--workdir is the report folder).')
  if not 0 <= r.loss_smoothing < 1:
    raise config_check.ConfigError(
        f'report.loss_smoothing={r.loss_smoothing} must be in [0, 1) (TensorBoard: 0.6).')
  runs = read_runs(workdirs)
  os.makedirs(out_dir, exist_ok=True)
  reals_grid, reals_note = real_patches_grid(config)
  figures = {
      'schedules': plot_schedules(runs, os.path.join(out_dir, 'schedules.png'), r.dpi),
      'loss': plot_losses(runs, os.path.join(out_dir, 'loss.png'), r.loss_smoothing,
                          r.raw_loss_alpha, r.dpi),
      'samples': {run.name: plot_samples(
          run, reals_grid, os.path.join(out_dir, f'samples_{_file_name(run.name)}.png'),
          r.dpi) for run in runs},
      'metrics': plot_metrics(runs, os.path.join(out_dir, 'metrics.png'), r.dpi),
  }
  blocks = _blocks(config, runs, figures, reals_note)
  paths = {'md': os.path.join(out_dir, REPORT_MD), 'html': os.path.join(out_dir, REPORT_HTML)}
  with open(paths['md'], 'w') as f:
    f.write(render_markdown(blocks))
  with open(paths['html'], 'w') as f:
    f.write(render_html(blocks))
  return paths
