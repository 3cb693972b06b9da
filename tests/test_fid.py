"""Tests of eo_ddpm_jax.fid: against pytorch-fid and independent NumPy formulas."""

import os

import numpy as np
import pytest

from eo_ddpm_jax import fid


def random_statistics(seed, dim=16, count=200):
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(count, dim)) @ rng.normal(size=(dim, dim)) + rng.normal(size=dim)
  return fid.feature_statistics(features)


def numpy_frechet(mu1, sigma1, mu2, sigma2):
  """Symmetric form: tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2))."""
  w, v = np.linalg.eigh(sigma1)
  root1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
  eig = np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)
  return np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eig).sum()


def test_frechet_distance_equals_pytorch_fid_and_numpy():
  from tests.torch_oracle import _install_torchvision_stand_in  # pylint: disable=g-import-not-at-top
  pytest.importorskip('torch', reason='needs the [torch] extra')
  _install_torchvision_stand_in()
  fid_score = pytest.importorskip('pytorch_fid.fid_score', reason='needs pytorch-fid')
  (mu1, sigma1), (mu2, sigma2) = random_statistics(0), random_statistics(1)
  ours = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
  assert ours == pytest.approx(fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2),
                               rel=1e-9)
  assert ours == pytest.approx(numpy_frechet(mu1, sigma1, mu2, sigma2), rel=1e-8)
  assert fid.frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0, abs=1e-8)
  # Rank-deficient covariances (fewer samples than dimensions) still give a finite value.
  (mu3, sigma3), (mu4, sigma4) = random_statistics(2, 32, 10), random_statistics(3, 32, 10)
  assert fid.frechet_distance(mu3, sigma3, mu4, sigma4) == pytest.approx(
      numpy_frechet(mu3, sigma3, mu4, sigma4), rel=1e-4)


def test_frechet_distance_of_1d_gaussians_is_closed_form():
  # (m1 - m2)^2 + (s1 - s2)^2 for scalars.
  assert fid.frechet_distance([1.0], [[4.0]], [-0.5], [[0.25]]) == pytest.approx(
      1.5 ** 2 + 1.5 ** 2, rel=1e-12)


def loop_mmd2(x, y):
  """Unbiased MMD^2 with (x.y/d + 1)^3, by explicit double loops."""
  d = x.shape[1]
  k = lambda a, b: (np.dot(a, b) / d + 1) ** 3
  m, n = len(x), len(y)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return xx + yy - 2 * xy


def test_kid_equals_double_loop_and_is_unbiased():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(12, 5)), rng.normal(0.5, 1.0, size=(9, 5))
  assert fid.polynomial_mmd2(x, y) == pytest.approx(loop_mmd2(x, y), rel=1e-12)
  # The KID mean is the mean MMD over the subsets that the same generator draws.
  draw = np.random.default_rng(1)
  expected = [loop_mmd2(x[draw.choice(12, 9, replace=False)], y[draw.choice(9, 9, replace=False)])
              for _ in range(3)]
  mean, std = fid.kernel_inception_distance(x, y, np.random.default_rng(1), num_subsets=3,
                                            subset_size=9)
  assert mean == pytest.approx(np.mean(expected), rel=1e-12)
  assert std == pytest.approx(np.std(expected), rel=1e-9)
  # Same distribution: unbiased, so the mean over subsets is ~0 (within its spread).
  a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
  mean, std = fid.kernel_inception_distance(a, b, np.random.default_rng(2), num_subsets=20,
                                            subset_size=100)
  assert abs(mean) < 3 * std / np.sqrt(20) + 1e-3
  shifted, _ = fid.kernel_inception_distance(a, b + 1.0, np.random.default_rng(2),
                                             num_subsets=20, subset_size=100)
  assert shifted > 10 * std


def test_extract_features_pads_and_maps_range():
  seen = []

  def feature_fn(unit):
    seen.append(unit.shape)
    return unit.mean(axis=(1, 2))  # [B, 3] stands in for the 2048 features.

  images = np.linspace(-1, 1, 5 * 2 * 2 * 3).reshape(5, 2, 2, 3)
  features = fid.extract_features(feature_fn, [images[:3], images[3:]], batch_size=3)
  assert seen == [(3, 2, 2, 3), (3, 2, 2, 3)]  # The short batch was padded.
  np.testing.assert_allclose(features, ((images + 1) / 2).mean(axis=(1, 2)), rtol=1e-6)


def test_real_statistics_are_cached_by_key(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  os.makedirs(data_dir)
  calls = []
  features = np.random.default_rng(0).normal(size=(6, 4))

  def compute():
    calls.append(1)
    return features

  mu, sigma = fid.cached_real_statistics(data_dir, 'train', 128, 6, compute)
  path = fid.real_statistics_path(data_dir, 'train', 128, 6)
  assert os.path.dirname(path) == str(tmp_path) and os.path.exists(path)
  again = fid.cached_real_statistics(data_dir, 'train', 128, 6, compute)
  assert len(calls) == 1
  np.testing.assert_array_equal(again[0], mu)
  np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-12)
  fid.cached_real_statistics(data_dir, 'test', 128, 6, compute)  # Another key: computed.
  assert len(calls) == 2
  with pytest.raises(ValueError, match='expected features of 7'):
    fid.cached_real_statistics(data_dir, 'train', 128, 7, compute)


def test_hosts_missing_the_cache_together_each_write_their_own_file(tmp_path, monkeypatch):
  """Two hosts of one run miss the cache at once; the second writes and renames its
  file between the first one's write and rename. Both get the features; no file is left
  half-written or behind."""
  data_dir = str(tmp_path / 'tfds')
  os.makedirs(data_dir)
  features = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
  real_replace = os.replace
  renames = []

  def replace_after_the_other_host(src, dst):
    renames.append(src)
    if len(renames) == 1:  # The first host's file is written; the other host runs now.
      other = fid.cached_real_features(data_dir, 'train', 128, 6, lambda: features)
      np.testing.assert_array_equal(other, features)
    real_replace(src, dst)

  monkeypatch.setattr(os, 'replace', replace_after_the_other_host)
  first = fid.cached_real_features(data_dir, 'train', 128, 6, lambda: features)
  np.testing.assert_array_equal(first, features)
  assert len(renames) == 2
  cache_file = os.path.basename(fid.real_statistics_path(data_dir, 'train', 128, 6))
  assert sorted(os.listdir(tmp_path)) == sorted([cache_file, 'tfds'])
  cached = fid.cached_real_features(data_dir, 'train', 128, 6, lambda: 1 / 0)  # A hit.
  np.testing.assert_array_equal(cached, features)


@pytest.mark.parametrize('count1, count2', [(300, 200), (6, 9), (5, 300)])
def test_frechet_distance_of_features_equals_eigen_form_and_sqrtm(count1, count2):
  rng = np.random.default_rng(count1)
  dim = 16
  features1 = rng.normal(size=(count1, dim)) @ rng.normal(size=(dim, dim))
  features2 = rng.normal(size=(count2, dim)) @ rng.normal(size=(dim, dim)) + 0.5
  stats1, stats2 = fid.feature_statistics(features1), fid.feature_statistics(features2)
  ours = fid.frechet_distance_of_features(features1, features2)
  # Exact, also for the rank-deficient covariances of fewer images than dimensions (where
  # the eigen form takes square roots of rounding-level eigenvalues: ~1e-8 relative).
  assert ours == pytest.approx(numpy_frechet(*stats1, *stats2), rel=1e-7)
  if min(count1, count2) > dim:  # Full rank: pytorch-fid's sqrtm form agrees.
    assert ours == pytest.approx(fid.frechet_distance(*stats1, *stats2), rel=1e-9)
  assert fid.frechet_distance_of_features(features1, features1) == pytest.approx(0, abs=1e-8)
