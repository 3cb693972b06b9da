"""Tests of --mode=report (eo_ddpm_jax.report) on three run folders with known contents."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from eo_ddpm_jax import evaluate
from eo_ddpm_jax import report
from eo_ddpm_jax import run_config
from eo_ddpm_jax import sampling
from tests.test_evaluate import ROOT, build_dataset, cli_flags, make_config

SCHEDULES = ('linear', 'cosine', 'sigmoid')
STEPS = np.arange(1, 61)
# Known loss curves: sigmoid ends lowest.
LOSS_SCALE = {'linear': 1.0, 'cosine': 2.0, 'sigmoid': 0.5}
EPOCHS = (1, 2, 3)


def closed_form_smoothing(values, weight):
  """s_n = (1 - w) sum_k w^(n-k) x_k / (1 - w^n) over the finite x_k, written out."""
  out, finite = [], []
  for value in values:
    if not np.isfinite(value):
      out.append(value)
      continue
    finite.append(value)
    n = len(finite)
    total = sum((1 - weight) * weight ** (n - k) * x for k, x in enumerate(finite, 1))
    out.append(total / (1 - weight ** n))
  return np.array(out)


@pytest.mark.parametrize('weight', [0.0, 0.6, 0.95])
def test_smoothing_equals_closed_form(weight):
  values = np.random.default_rng(0).lognormal(size=50)
  values[[7, 20]] = [np.nan, np.inf]  # Passed through, and skipped by the average.
  got = report.smooth_tensorboard(values, weight)
  np.testing.assert_allclose(got, closed_form_smoothing(values, weight), rtol=1e-12)
  assert np.isnan(got[7]) and got[20] == np.inf
  if weight == 0:
    np.testing.assert_array_equal(got[np.isfinite(values)], values[np.isfinite(values)])
  # Debiased: a constant curve stays constant from its first point.
  np.testing.assert_allclose(report.smooth_tensorboard(np.full(9, 0.3), weight), 0.3)
  with pytest.raises(ValueError, match=r'in \[0, 1\)'):
    report.smooth_tensorboard(values, 1.0)


def format_or_dash(value):
  return '–' if value is None else f'{value:.4g}'


def _losses(schedule):
  return LOSS_SCALE[schedule] / STEPS * (1 + 0.3 * np.sin(STEPS))


def _eval_entry(step, epoch, fid_value, w1):
  """An eval.json entry with known metrics (floors: a tenth of each value)."""
  metrics = {'fid': fid_value, 'kid_mean': None if fid_value is None else fid_value / 1000,
             'kid_std': None, 'raps_log10_mad': 0.5 + w1}
  for i, band in enumerate('RGB'):
    metrics.update({f'w1_{band}': w1 * (i + 1), f'mean_diff_{band}': 0.01 * (i + 1),
                    f'std_diff_{band}': 0.02 * (i + 1)})
  metrics.update({report.floor_name(k): None if v is None else v / 10
                  for k, v in list(metrics.items())})
  return {'step': step, 'epoch': epoch, 'sampler': 'dpm_solver', 'steps': 25,
          'metrics': metrics}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Three run folders: config.json, metrics.jsonl, epoch grids; eval.json for two."""
  base = tmp_path_factory.mktemp('runs')
  data_dir = build_dataset(base, {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'})
  workdirs = {}
  rng = np.random.default_rng(0)
  for schedule in SCHEDULES:
    workdir = str(base / f'run_{schedule}')
    os.makedirs(os.path.join(workdir, 'samples'))
    config = make_config(data_dir, **{'diffusion.schedule': schedule,
                                      'diffusion.timesteps': 100})
    run_config.save_config(config, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      for step, loss in zip(STEPS, _losses(schedule)):
        f.write(json.dumps({'step': int(step), 'loss': float(loss), 'grad_norm': 1.0}) + '\n')
    for epoch in EPOCHS:
      sampling.save_png(os.path.join(workdir, 'samples', f'epoch_{epoch:03d}.png'),
                        sampling.image_grid(rng.uniform(-1, 1, (4, 16, 16, 3))))
    workdirs[schedule] = workdir
  # linear: FID; cosine: none (no Inception weights); sigmoid: not evaluated.
  for step, epoch in ((20, 1), (60, 3)):
    evaluate.write_eval_entry(workdirs['linear'], _eval_entry(step, epoch, 50.0 / epoch,
                                                               0.2 / epoch))
    evaluate.write_eval_entry(workdirs['cosine'], _eval_entry(step, epoch, None,
                                                               0.1 / epoch))
  return data_dir, workdirs


@pytest.fixture(scope='module')
def made(runs, tmp_path_factory):
  """The report of the three runs, made through the command line."""
  data_dir, workdirs = runs
  out = str(tmp_path_factory.mktemp('report'))
  result = subprocess.run(
      [sys.executable, '-m', 'eo_ddpm_jax.main', '--config=configs/demo.py',
       f'--workdir={out}', '--mode=report',
       '--report_workdirs=' + ','.join(workdirs[s] for s in SCHEDULES), *cli_flags(data_dir)],
      cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'},
      capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-5000:]
  with open(os.path.join(out, report.REPORT_MD)) as f:
    md = f.read()
  with open(os.path.join(out, report.REPORT_HTML)) as f:
    page = f.read()
  return out, md, page


def test_every_figure_is_a_png_the_html_shows(made):
  out, md, page = made
  pngs = sorted(name for name in os.listdir(out) if name.endswith('.png'))
  assert pngs == ['loss.png', 'metrics.png', 'samples_cosine.png', 'samples_linear.png',
                  'samples_sigmoid.png', 'schedules.png']
  for name in pngs:
    path = os.path.join(out, name)
    assert os.path.getsize(path) > 0
    with Image.open(path) as image:
      image.verify()  # A complete, valid PNG.
    with Image.open(path) as image:
      assert image.format == 'PNG' and min(image.size) > 100
      # Not blank: a figure has lines or images on it.
      assert np.asarray(image.convert('L')).std() > 5
  assert sorted(re.findall(r'<img src="([^"]+)"', page)) == pngs
  assert sorted(re.findall(r'!\[[^]]*\]\(([^)]+)\)', md)) == pngs
  # Self-contained: no scripts, styles or images from elsewhere.
  assert '<script' not in page and 'http' not in page and '<link' not in page


def test_sample_figure_holds_both_epochs_and_reals(made):
  out, md, _ = made
  # Three panels (epoch 1, epoch 3, real patches) make the figure about 3x wider than tall.
  with Image.open(os.path.join(out, 'samples_linear.png')) as image:
    assert 2.3 < image.size[0] / image.size[1] < 3.5
  assert 'No real patches are shown' not in md


def test_table_has_the_eval_json_numbers_and_floors(made, runs):
  _, md, page = made
  _, workdirs = runs
  rows = {tuple(c.strip() for c in line.strip('|').split('|'))[:3]: line
          for line in md.splitlines() if line.startswith('| ')}
  for schedule in ('linear', 'cosine'):
    for entry in evaluate.read_eval_json(workdirs[schedule]).values():
      line = rows[(schedule, str(entry['epoch']), str(entry['step']))]
      cells = [c.strip() for c in line.strip('|').split('|')]
      m = entry['metrics']
      fid_cell = '–' if m['fid'] is None else f'{m["fid"]:.4g}'
      expected = [fid_cell, '–' if m['kid_mean'] is None else f'{m["kid_mean"]:.4g}',
                  f'{m["w1_R"]:.4g}', f'{m["w1_G"]:.4g}', f'{m["w1_B"]:.4g}',
                  f'{np.mean([m[f"mean_diff_{b}"] for b in "RGB"]):.4g}',
                  f'{np.mean([m[f"std_diff_{b}"] for b in "RGB"]):.4g}',
                  f'{m["raps_log10_mad"]:.4g}']
      assert cells[3] == 'dpm_solver 25' and cells[4:] == expected
    floor = [c.strip() for c in rows[(f'{schedule}: real vs real', '–', '–')]
             .strip('|').split('|')]
    last = evaluate.read_eval_json(workdirs[schedule])['60']['metrics']
    assert floor[4:7] == [format_or_dash(last['fid_floor']),
                          format_or_dash(last['kid_floor_mean']), f'{last["w1_R_floor"]:.4g}']
  assert not any(key[0] == 'sigmoid' for key in rows)  # Not evaluated: no rows.
  # The HTML has the same table.
  assert '<td>linear: real vs real</td>' in page and f'<td>{50.0 / 3:.4g}</td>' in page


def test_text_names_the_best_runs_with_numbers(made):
  _, md, page = made
  finals = {s: closed_form_smoothing(_losses(s), 0.6)[-1] for s in SCHEDULES}
  assert ('Final smoothed loss: ' + ', '.join(f'{s} {finals[s]:.4g} (step 60)'
                                              for s in SCHEDULES) + '. Lowest: sigmoid.') in md
  # Last evaluated epoch: linear's FID 16.67 (only run with one); cosine's W1 is lower.
  assert f'Lowest FID at the last evaluated epoch: linear, {50 / 3:.4g} (real-vs-real ' \
         f'floor {50 / 30:.4g}).' in md
  assert f'Lowest mean band W1 at the last evaluated epoch: cosine, {0.2 / 3:.4g}' in md
  assert 'T = 100' in md and 'linear: T = 100' in md
  assert 'Lowest: sigmoid.' in page  # The HTML tells the same.


def test_runs_sharing_a_schedule_are_named_by_folder_and_missing_data_is_said(
    runs, tmp_path):
  _, workdirs = runs
  config = make_config(str(tmp_path / 'no_data'))
  copy = str(tmp_path / 'again')
  os.makedirs(copy)
  run_config.save_config(run_config.load_config(workdirs['linear']), copy)
  paths = report.make_report(config, [workdirs['linear'], copy], str(tmp_path / 'out'))
  with open(paths['md']) as f:
    md = f.read()
  assert 'linear (run_linear)' in md and 'linear (again)' in md
  assert (f'No real patches are shown: the dataset sen12ms/summer_rgb could not be opened '
          f'under data.data_dir={tmp_path / "no_data"}') in md
  # The copy has no losses, grids or eval.json: said, not drawn.
  assert 'linear (again): no sample grids' in md
  assert sorted(n for n in os.listdir(tmp_path / 'out') if n.endswith('.png')) == [
      'loss.png', 'metrics.png', 'samples_linear_run_linear.png', 'schedules.png']
  with pytest.raises(FileNotFoundError, match='does not exist'):
    report.make_report(config, [str(tmp_path / 'missing')], str(tmp_path / 'out'))
  with pytest.raises(ValueError, match='--report_workdirs'):
    report.make_report(config, [], str(tmp_path / 'out'))
