"""Earth-observation statistics of generated patches that need no pretrained network.

Images are float arrays [N, H, W, 3] (R, G, B) in the project's range [-1, 1]; square
patches for the spectrum. Each comparison of samples with real patches comes with a floor:
the same comparison between two disjoint random halves of the real patches, i.e. the
value that sampling noise alone gives.
- Per-band value distribution: Wasserstein-1 between the pixel values of a band.
- Per-band mean and standard deviation: absolute differences.
- Texture and sharpness: the radially averaged power spectrum (RAPS) of each band, averaged
  over bands and images, and the mean absolute difference of log10 power between curves.
All float64 NumPy on the host.
"""

import numpy as np

BANDS = ('R', 'G', 'B')


def band_wasserstein(samples, reals) -> np.ndarray:
  """Wasserstein-1 distance between the pixel values of each band.

  Args:
    samples: [N, H, W, 3]; reals: [M, H', W', 3] (any sizes).
  Returns:
    float64 [3], in the images' units.
  """
  return np.array([_wasserstein_1d(np.asarray(samples)[..., band].ravel(),
                                   np.asarray(reals)[..., band].ravel())
                   for band in range(len(BANDS))])


def _wasserstein_1d(u, v) -> float:
  """W1 = integral |F_u - F_v| of two empirical distributions."""
  u, v = np.sort(u.astype(np.float64)), np.sort(v.astype(np.float64))
  support = np.sort(np.concatenate([u, v]))
  cdf_u = np.searchsorted(u, support[:-1], side='right') / u.size
  cdf_v = np.searchsorted(v, support[:-1], side='right') / v.size
  return float(np.sum(np.abs(cdf_u - cdf_v) * np.diff(support)))


def band_mean_std(images) -> tuple[np.ndarray, np.ndarray]:
  """Per-band mean and standard deviation over all pixels: (float64 [3], float64 [3])."""
  values = np.asarray(images, np.float64).reshape(-1, len(BANDS))
  return values.mean(0), values.std(0)


def radial_power_spectrum(images) -> tuple[np.ndarray, np.ndarray]:
  """RAPS: |FFT|^2 / (H W) per band, averaged over rings of integer radius, bands, images.

  The mean of each band and image is removed first (it is the DC term, compared by
  band_mean_std). A pixel's radius is sqrt(ky^2 + kx^2) in cycles per image side,
  rounded; radii 1 .. H // 2 are returned (the rings that are complete).

  Args:
    images: [N, H, H, C] (square).
  Returns:
    (radii int [H // 2], power float64 [H // 2]); white noise of variance s^2 gives s^2.
  """
  images = np.asarray(images, np.float64)
  size = images.shape[1]
  if images.shape[2] != size:
    raise ValueError(f'the power spectrum needs square images, got {images.shape[1:3]}')
  centred = images - images.mean(axis=(1, 2), keepdims=True)
  power = np.abs(np.fft.fft2(centred, axes=(1, 2))) ** 2 / (size * size)
  power = power.mean(axis=(0, 3))  # [H, W]: over images and bands.
  k = np.fft.fftfreq(size) * size
  radius = np.rint(np.hypot(k[:, None], k[None, :])).astype(np.int64)
  radii = np.arange(1, size // 2 + 1)
  sums = np.bincount(radius.ravel(), weights=power.ravel(), minlength=size)
  counts = np.bincount(radius.ravel(), minlength=size)
  return radii, sums[radii] / counts[radii]


def raps_distance(power1, power2) -> float:
  """Mean absolute difference of log10 power between two RAPS curves (0 = same)."""
  return float(np.mean(np.abs(np.log10(power1) - np.log10(power2))))


def _compare(samples, reals) -> dict[str, float]:
  """Every metric of samples against reals, by name."""
  metrics = {}
  for band, value in zip(BANDS, band_wasserstein(samples, reals)):
    metrics[f'w1_{band}'] = value
  (mean_s, std_s), (mean_r, std_r) = band_mean_std(samples), band_mean_std(reals)
  for i, band in enumerate(BANDS):
    metrics[f'mean_diff_{band}'] = abs(mean_s[i] - mean_r[i])
    metrics[f'std_diff_{band}'] = abs(std_s[i] - std_r[i])
  metrics['raps_log10_mad'] = raps_distance(radial_power_spectrum(samples)[1],
                                            radial_power_spectrum(reals)[1])
  return {name: float(value) for name, value in metrics.items()}


def eo_statistics(samples, reals, rng: np.random.Generator) -> dict[str, float]:
  """Every EO metric of samples vs reals, each with its real-vs-real floor.

  Args:
    samples: [N, H, H, 3] in [-1, 1]. reals: [M >= 2, H, H, 3] in [-1, 1].
    rng: draws the random split of the reals into two disjoint halves.
  Returns:
    {name: value, name + '_floor': value of half vs half of the reals} for w1_{R,G,B},
    mean_diff_{R,G,B}, std_diff_{R,G,B}, raps_log10_mad; plus the per-band
    sample_mean_*, real_mean_*, sample_std_*, real_std_*.
  """
  reals = np.asarray(reals)
  if reals.shape[0] < 2:
    raise ValueError('the floor needs at least 2 real images (two halves)')
  order = rng.permutation(reals.shape[0])
  half = reals.shape[0] // 2
  result = _compare(samples, reals)
  floor = _compare(reals[order[:half]], reals[order[half:2 * half]])
  result.update({f'{name}_floor': value for name, value in floor.items()})
  for prefix, images in (('sample', samples), ('real', reals)):
    mean, std = band_mean_std(images)
    for i, band in enumerate(BANDS):
      result[f'{prefix}_mean_{band}'] = float(mean[i])
      result[f'{prefix}_std_{band}'] = float(std[i])
  return result
