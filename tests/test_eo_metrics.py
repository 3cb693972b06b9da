"""Tests of eo_ddpm_jax.eo_metrics against scipy and closed forms."""

import numpy as np
import pytest
import scipy.stats

from eo_ddpm_jax import eo_metrics


def test_band_wasserstein_equals_scipy():
  rng = np.random.default_rng(0)
  samples = rng.uniform(-1, 1, (3, 8, 8, 3)) ** 3
  reals = np.tanh(rng.normal(0.2, 0.6, (5, 6, 6, 3)))
  ours = eo_metrics.band_wasserstein(samples, reals)
  for band in range(3):
    assert ours[band] == pytest.approx(scipy.stats.wasserstein_distance(
        samples[..., band].ravel(), reals[..., band].ravel()), rel=1e-12)
  # A shift by c moves every band by exactly c.
  np.testing.assert_allclose(eo_metrics.band_wasserstein(reals + 0.3, reals), 0.3, rtol=1e-12)


def test_radial_power_spectrum_closed_forms():
  size, k0, amplitude = 32, 5, 0.7
  x = np.arange(size)
  wave = amplitude * np.cos(2 * np.pi * k0 * x / size)
  images = np.broadcast_to(wave[None, None, :, None], (2, size, size, 3))
  radii, power = eo_metrics.radial_power_spectrum(images)
  np.testing.assert_array_equal(radii, np.arange(1, size // 2 + 1))
  # Two peaks of |F|^2/(HW) = A^2 HW / 4 at (0, +-k0), spread over the ring of radius k0.
  ky, kx = np.meshgrid(np.fft.fftfreq(size) * size, np.fft.fftfreq(size) * size, indexing='ij')
  ring = int(np.sum(np.rint(np.sqrt(ky ** 2 + kx ** 2)) == k0))
  expected = 2 * amplitude ** 2 * size * size / 4 / ring
  assert power[k0 - 1] == pytest.approx(expected, rel=1e-10)
  assert np.delete(power, k0 - 1).max() < 1e-20
  # White noise of variance s^2: flat at s^2.
  noise = np.random.default_rng(1).normal(0, 0.3, (64, size, size, 3))
  _, flat = eo_metrics.radial_power_spectrum(noise)
  np.testing.assert_allclose(flat[3:], 0.09, rtol=0.1)  # Small rings hold few pixels.
  assert np.mean(flat) == pytest.approx(0.09, rel=0.02)
  assert eo_metrics.raps_distance(flat, 10 * flat) == pytest.approx(1.0, rel=1e-12)


def test_eo_statistics_values_and_floors():
  rng = np.random.default_rng(2)
  reals = np.clip(rng.normal(0.1, 0.3, (40, 16, 16, 3)), -1, 1)
  samples = np.clip(rng.normal(-0.2, 0.5, (30, 16, 16, 3)), -1, 1)
  stats = eo_metrics.eo_statistics(samples, reals, np.random.default_rng(3))
  names = [f'{m}_{b}' for m in ('w1', 'mean_diff', 'std_diff') for b in 'RGB']
  for name in names + ['raps_log10_mad']:
    assert stats[name] > stats[name + '_floor'] >= 0
  mean_s, std_s = eo_metrics.band_mean_std(samples)
  assert stats['sample_mean_G'] == pytest.approx(samples[..., 1].mean())
  assert stats['mean_diff_R'] == pytest.approx(abs(mean_s[0] - reals[..., 0].mean()))
  assert stats['std_diff_B'] == pytest.approx(abs(std_s[2] - reals[..., 2].std()))
  # The floor is the same comparison between the two halves of the permuted reals.
  order = np.random.default_rng(3).permutation(40)
  halves = reals[order[:20]], reals[order[20:]]
  assert stats['w1_G_floor'] == pytest.approx(scipy.stats.wasserstein_distance(
      halves[0][..., 1].ravel(), halves[1][..., 1].ravel()), rel=1e-12)
  # Samples from the real distribution sit near the floor.
  same = eo_metrics.eo_statistics(reals[:20], reals[20:], np.random.default_rng(4))
  assert same['w1_R'] < 3 * same['w1_R_floor'] + 1e-3
