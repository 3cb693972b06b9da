"""FID and KID on Inception pool features, and the cached statistics of the real images.

FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to the 2048-d
features of two image sets. KID (Binkowski et al. 2018): the unbiased squared MMD with the
polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets. Features come
from `inception.FIDInceptionV3` (pytorch-fid's network); this module takes images in the
project's range [-1, 1] and feeds the network [0, 1], as pytorch-fid does with PNGs read as
float / 255 (no 8-bit quantisation here: quantise the samples first to match a PNG-based
FID exactly). The distances are float64 NumPy on the host.
"""

import os
from typing import Callable, Iterable
import uuid

import numpy as np
import scipy.linalg

# pytorch-fid's offset for a singular covariance product, and its tolerance on the
# imaginary part that sqrtm's rounding leaves.
SQRTM_EPS = 1e-6
IMAGINARY_ATOL = 1e-3
# KID's polynomial kernel degree and subsets (Binkowski et al. 2018; as torch-fidelity).
KID_DEGREE = 3
KID_NUM_SUBSETS = 100
KID_SUBSET_SIZE = 1000


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """[N, D] features -> (mean [D], covariance [D, D] with N - 1), float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f'need [N >= 2, D] features, got shape {features.shape}')
  return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), as pytorch-fid computes it.

  Args:
    mu1, mu2: [D] means. sigma1, sigma2: [D, D] covariances.
  Returns:
    The distance (>= 0 up to rounding).
  """
  mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
  sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(
      np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f'statistics differ in shape: {mu1.shape} vs {mu2.shape}, '
                     f'{sigma1.shape} vs {sigma2.shape}')
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    # A singular product: offset both covariances slightly.
    offset = np.eye(sigma1.shape[0]) * SQRTM_EPS
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    largest = np.max(np.abs(np.diagonal(covmean).imag))
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_ATOL):
      raise ValueError(f'the covariance square root has an imaginary part of {largest}')
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _covariance_factor(features: np.ndarray) -> np.ndarray:
  """[D, K] L with L L^T = the covariance of [N, D] features (N - 1), K = min(N, D)."""
  centred = features - features.mean(0)
  count, dim = features.shape
  if count <= dim:  # The centred features themselves: rank N - 1, no D x D matrix.
    return centred.T / np.sqrt(count - 1)
  values, vectors = np.linalg.eigh(np.cov(features, rowvar=False))
  return vectors * np.sqrt(np.clip(values, 0, None))


def frechet_distance_of_features(features1, features2) -> float:
  """The Fréchet distance of the Gaussians fitted to two feature sets, without sqrtm.

  With covariances S_i = L_i L_i^T, the eigenvalues of S1 S2 are the squared singular
  values of L1^T L2, so tr((S1 S2)^(1/2)) is the sum of those singular values: two
  symmetric eigendecompositions (none for a set of N <= D, whose centred features are
  a factor) and one SVD, instead of scipy's Schur-based sqrtm that frechet_distance
  runs as pytorch-fid does (about a minute for D = 2048 on 2 CPU cores). Equal to it
  to rounding where the covariances have full rank; exact also where they do not
  (fewer images than dimensions), where pytorch-fid offsets them by SQRTM_EPS.

  Args:
    features1: [N1 >= 2, D]; features2: [N2 >= 2, D].
  Returns:
    The distance (>= 0 up to rounding).
  """
  features1 = np.asarray(features1, np.float64)
  features2 = np.asarray(features2, np.float64)
  for features in (features1, features2):
    if features.ndim != 2 or features.shape[0] < 2:
      raise ValueError(f'need [N >= 2, D] features, got shape {features.shape}')
  if features1.shape[1] != features2.shape[1]:
    raise ValueError(f'features differ in dimension: {features1.shape} vs {features2.shape}')
  factor1, factor2 = _covariance_factor(features1), _covariance_factor(features2)
  trace_sqrt = np.linalg.svd(factor1.T @ factor2, compute_uv=False).sum()
  diff = features1.mean(0) - features2.mean(0)
  return float(diff @ diff + np.sum(factor1 ** 2) + np.sum(factor2 ** 2) - 2 * trace_sqrt)


def polynomial_mmd2(x, y) -> float:
  """Unbiased squared MMD of [m, D] and [n, D] with k = (x.y / D + 1)^3, float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  dim = x.shape[1]
  k_xx = (x @ x.T / dim + 1) ** KID_DEGREE
  k_yy = (y @ y.T / dim + 1) ** KID_DEGREE
  k_xy = (x @ y.T / dim + 1) ** KID_DEGREE
  m, n = x.shape[0], y.shape[0]
  # Unbiased: the diagonal (k(x_i, x_i)) is left out of the within-set means.
  within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
  within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
  return float(within_x + within_y - 2 * k_xy.mean())


def kernel_inception_distance(features1, features2, rng: np.random.Generator, *,
                              num_subsets: int = KID_NUM_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE) -> tuple[float, float]:
  """KID: mean and standard deviation of polynomial_mmd2 over random subsets.

  Each subset draws min(subset_size, N1, N2) rows of each set without replacement.

  Returns:
    (mean, std) over the num_subsets values.
  """
  features1, features2 = np.asarray(features1), np.asarray(features2)
  size = min(subset_size, features1.shape[0], features2.shape[0])
  if size < 2:
    raise ValueError('KID needs at least 2 features in each set')
  values = [polynomial_mmd2(features1[rng.choice(features1.shape[0], size, replace=False)],
                            features2[rng.choice(features2.shape[0], size, replace=False)])
            for _ in range(num_subsets)]
  return float(np.mean(values)), float(np.std(values))


def extract_features(feature_fn: Callable, batches: Iterable, batch_size: int) -> np.ndarray:
  """Inception features of image batches in [-1, 1].

  Args:
    feature_fn: inception.make_feature_fn(...): [B, H, W, 3] in [0, 1] -> [B, 2048].
    batches: iterable of float arrays [b <= batch_size, H, W, 3] in [-1, 1].
    batch_size: the compiled batch; a short batch is padded to it (one compilation) and
      the padding's features dropped.
  Returns:
    float32 [N, 2048], N = total images.
  """
  outputs = []
  for batch in batches:
    batch = np.asarray(batch, np.float32)
    count = batch.shape[0]
    if count > batch_size:
      raise ValueError(f'a batch of {count} images exceeds batch_size={batch_size}')
    if count < batch_size:
      padding = np.zeros((batch_size - count,) + batch.shape[1:], np.float32)
      batch = np.concatenate([batch, padding])
    unit = (batch + 1) / 2  # [-1, 1] -> [0, 1], pytorch-fid's input range.
    outputs.append(np.asarray(feature_fn(unit))[:count])
  if not outputs:
    raise ValueError('no images to extract features from')
  return np.concatenate(outputs)


def real_statistics_path(data_dir: str, split: str, image_size: int, num_samples: int) -> str:
  """The cache file of a split's statistics: an .npz next to the dataset dir."""
  data_dir = os.path.normpath(data_dir)
  name = f'{os.path.basename(data_dir)}_fid_stats_{split}_{image_size}px_{num_samples}.npz'
  return os.path.join(os.path.dirname(data_dir), name)


def _cached_real(data_dir: str, split: str, image_size: int, num_samples: int,
                 compute_features: Callable[[], np.ndarray], tag: str) -> dict[str, np.ndarray]:
  """The cache file's arrays (features, mu, sigma), computing and writing them on a miss."""
  path = real_statistics_path(data_dir, split, image_size, num_samples)
  key = np.array([split, str(image_size), str(num_samples), tag])
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as cached:
      # An older file without features, or another key (e.g. other weights): recompute.
      if np.array_equal(cached['key'], key) and 'features' in cached.files:
        return {name: cached[name] for name in ('features', 'mu', 'sigma')}
  features = np.asarray(compute_features())
  if features.shape[0] != num_samples:
    raise ValueError(f'expected features of {num_samples} real images, got {features.shape[0]}')
  mu, sigma = feature_statistics(features)
  features = features.astype(np.float32)  # The network's own precision.
  # Written whole, then renamed: no partial cache file. The temporary name is this
  # writer's own, as the hosts of a multi-host run miss the cache together.
  tmp_path = f'{path}.{uuid.uuid4().hex}.tmp.npz'
  np.savez(tmp_path, features=features, mu=mu, sigma=sigma, key=key)
  os.replace(tmp_path, path)
  return {'features': features, 'mu': mu, 'sigma': sigma}


def cached_real_statistics(data_dir: str, split: str, image_size: int, num_samples: int,
                           compute_features: Callable[[], np.ndarray], tag: str = ''
                           ) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of the real images' features, computed once and cached on disk.

  Args:
    data_dir: the dataset dir; the cache lies beside it (real_statistics_path).
    split, image_size, num_samples: the cache key (also stored in the file and checked).
    compute_features: called on a cache miss: -> [num_samples, 2048] features.
    tag: more of the key, e.g. the weights and the choice of images; a file with
      another tag is recomputed and replaced.
  Returns:
    (mu [2048], sigma [2048, 2048]) float64.
  """
  cached = _cached_real(data_dir, split, image_size, num_samples, compute_features, tag)
  return cached['mu'], cached['sigma']


def cached_real_features(data_dir: str, split: str, image_size: int, num_samples: int,
                         compute_features: Callable[[], np.ndarray], tag: str = ''
                         ) -> np.ndarray:
  """The real images' features themselves (KID needs them), from the same cache.

  Arguments as cached_real_statistics. Returns float32 [num_samples, 2048].
  """
  cached = _cached_real(data_dir, split, image_size, num_samples, compute_features, tag)
  return cached['features']
