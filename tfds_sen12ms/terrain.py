"""Procedural Sentinel-2 L1C scenes: land cover from multi-scale smooth noise, rendered
with a top-of-atmosphere reflectance spectrum per cover class (numpy and scipy only).

Cover, by priority: lakes and rivers, roads, urban blocks, forest, agricultural
parcels (green crops, ripe crops, bare soil). Output is TOA reflectance x 10000, uint16.
"""

import numpy as np
import scipy.fft
import scipy.ndimage

from tfds_sen12ms import layout

# TOA reflectance per band (B01..B12 with B8A 9th) of each endmember: typical summer
# L1C values (atmosphere included, hence blue/aerosol bands above surface values).
SPECTRA = {
    # Columns in layout.BAND_NAMES order: B01 .. B08, B8A, B09 .. B12.
    'water':   (.105, .075, .050, .028, .024, .019, .017, .013, .011, .005, .0015, .007, .004),
    'crop':    (.115, .082, .080, .042, .100, .250, .310, .340, .355, .105, .0030, .175, .085),
    'forest':  (.105, .068, .058, .032, .068, .185, .235, .255, .270, .085, .0025, .120, .052),
    'ripe':    (.125, .100, .112, .125, .160, .205, .225, .240, .252, .085, .0035, .270, .185),
    'soil':    (.135, .112, .128, .158, .190, .213, .228, .242, .256, .085, .0040, .315, .265),
    'roof':    (.150, .145, .148, .162, .172, .180, .186, .196, .200, .070, .0040, .230, .205),
    'asphalt': (.115, .088, .084, .084, .088, .094, .098, .104, .106, .040, .0030, .115, .100),
}
COVERS = tuple(SPECTRA)
_SAMPLES_PER_SCALE = 4  # Grid points per correlation length when synthesising noise.
# Rayleigh-like haze added per band (reflectance at unit haze), strongest in the blue.
HAZE = np.array((.030, .024, .014, .008, .006, .004, .003, .002, .002, .001, 0., 0., 0.),
                np.float32)


def smooth_noise(rng, shape, scales_px, weights=None):
  """Sum of Gaussian-smoothed white noise at several correlation lengths.

  Args:
    rng: np.random.Generator.
    shape: (H, W).
    scales_px: correlation lengths in pixels, coarse to fine.
    weights: amplitude of each scale (default: halving per octave).

  Returns:
    (H, W) float32 field with zero mean and unit standard deviation.
  """
  if weights is None:
    weights = [0.5 ** i for i in range(len(scales_px))]
  # A field without fine scales is synthesised on a coarser grid and upsampled
  # (bilinear is exact enough for features of >= _SAMPLES_PER_SCALE pixels).
  step = max(1, int(min(scales_px) / _SAMPLES_PER_SCALE))
  small = tuple(shape) if step == 1 else (shape[0] // step + 2, shape[1] // step + 2)
  spectrum = scipy.fft.rfft2(rng.standard_normal(small, dtype=np.float32))
  k2 = (np.fft.fftfreq(small[0])[:, None] ** 2
        + np.fft.rfftfreq(small[1])[None, :] ** 2).astype(np.float32)
  gain = sum(w * (s / step) * np.exp(-2 * (np.pi * s / step) ** 2 * k2)
             for s, w in zip(scales_px, weights))
  field = scipy.fft.irfft2(spectrum * gain, s=small)
  if step > 1:
    # Bilinear upsampling as two small matrix products (faster than ndimage.zoom).
    field = _interp_matrix(shape[0], small[0], step) @ field @ _interp_matrix(
        shape[1], small[1], step).T
  return ((field - field.mean()) / (field.std() + 1e-12)).astype(np.float32)


def _interp_matrix(n_out, n_in, step):
  """(n_out, n_in) float32 linear interpolation weights from a grid `step` times coarser."""
  pos = np.arange(n_out, dtype=np.float32) / step
  lo = np.minimum(pos.astype(np.int64), n_in - 2)
  frac = pos - lo
  m = np.zeros((n_out, n_in), np.float32)
  m[np.arange(n_out), lo] = 1 - frac
  m[np.arange(n_out), lo + 1] = frac
  return m


def _hash_uniform(*ints):
  """Deterministic uniform [0, 1) values from integer arrays (per parcel/block randomness)."""
  h = np.uint64(0x9E3779B97F4A7C15)
  for x in ints:
    h = (h ^ np.asarray(x).astype(np.int64).view(np.uint64)) * np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(31)
  # The top 24 bits: exactly representable in float32.
  return (h >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)


def _line_mask(field, width_px):
  """Pixels within width_px/2 of the zero set of a smooth field: meandering lines."""
  gy, gx = np.gradient(field)
  distance = np.abs(field) / (np.hypot(gx, gy) + 1e-6)
  return np.clip(width_px / 2 + 0.5 - distance, 0, 1)  # Anti-aliased edge.


def _rotated(shape, angle, warp=None):
  y, x = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
  u = x * np.cos(angle) + y * np.sin(angle)
  v = -x * np.sin(angle) + y * np.cos(angle)
  if warp is not None:
    u, v = u + warp[0], v + warp[1]
  return u, v


def land_cover(rng, shape, *, lake_fraction=(0.0, 0.08), urban_fraction=(0.0, 0.25),
               forest_fraction=(0.1, 0.35), river_width_px=(3.0, 9.0),
               parcel_size_px=(18, 60), block_size_px=(6, 14), road_width_px=1.6,
               river_probability=0.7):
  """Random land-cover abundances for one scene.

  Args:
    rng: np.random.Generator.
    shape: (H, W) in 10 m pixels.
    *_fraction, *_px: (low, high) ranges a scene draws its parameters from;
      road_width_px is fixed; river_probability: chance that a scene has rivers.

  Returns:
    (len(COVERS), H, W) float32 abundances in [0, 1] that sum to 1 per pixel.
  """
  a = np.zeros((len(COVERS),) + tuple(shape), np.float32)
  idx = {c: i for i, c in enumerate(COVERS)}

  # Agricultural parcels: a rotated, gently warped grid of rows; each row has its own
  # parcel length and offset; each parcel a crop state (green, ripe or bare soil).
  warp = (smooth_noise(rng, shape, [300]) * 25, smooth_noise(rng, shape, [300]) * 25)
  u, v = _rotated(shape, rng.uniform(0, np.pi), warp)
  row_h = rng.uniform(*parcel_size_px)
  row = np.floor(v / row_h)
  length = parcel_size_px[0] + _hash_uniform(row, 1) * (2 * parcel_size_px[1])
  along = (u + _hash_uniform(row, 2) * length) / length
  col = np.floor(along)
  kind = _hash_uniform(row, col, 3)
  green, ripe = kind < 0.55, (kind >= 0.55) & (kind < 0.8)  # Else bare soil.
  # Crop cover varies between fields and, a few percent, within them (soil moisture,
  # sowing density).
  cover = 0.55 + 0.45 * _hash_uniform(row, col, 4) + 0.08 * smooth_noise(rng, shape, [25, 5])
  cover = np.clip(cover, 0, 1)
  a[idx['crop']] = np.where(green, cover, np.where(ripe, 0.15 * cover, 0.05 * cover))
  a[idx['ripe']] = np.where(ripe, 1 - a[idx['crop']], 0)
  a[idx['soil']] = 1 - a[idx['crop']] - a[idx['ripe']]
  # Hedgerows and tracks on parcel edges.
  edge_px = np.minimum(np.minimum(v / row_h % 1, 1 - v / row_h % 1) * row_h,
                       np.minimum(along % 1, 1 - along % 1) * length)
  _paint(a, idx['forest'], np.clip(0.8 - edge_px, 0, 0.7))

  # Forest: coarse stands with rough, multi-scale borders.
  forest = smooth_noise(rng, shape, [180, 60, 15])
  threshold = np.quantile(forest, 1 - rng.uniform(*forest_fraction))
  _paint(a, idx['forest'], np.clip((forest - threshold) * 4, 0, 1))

  # Urban: blocks on a rotated street grid inside coarse urban areas; some blocks are
  # parks, roofs differ in brightness per block.
  urban = smooth_noise(rng, shape, [220, 70])
  threshold = np.quantile(urban, 1 - rng.uniform(*urban_fraction))
  urban_mask = np.clip((urban - threshold) * 6, 0, 1)
  bu, bv = _rotated(shape, rng.uniform(0, np.pi))
  block = rng.uniform(*block_size_px)
  bi, bj = np.floor(bu / block), np.floor(bv / block)
  street = (bu / block % 1 < 1.5 / block) | (bv / block % 1 < 1.5 / block)
  park = (_hash_uniform(bi, bj, 5) < 0.15) & ~street
  roof = np.where(street | park, 0, 0.55 + 0.45 * _hash_uniform(bi, bj, 6))
  grass = np.where(park, 0.7, 0)
  a *= 1 - urban_mask
  a[idx['roof']] += urban_mask * roof
  a[idx['crop']] += urban_mask * grass
  a[idx['asphalt']] += urban_mask * (1 - roof - grass)

  # Roads: a few long meandering lines; lakes: low ground; rivers: wider lines.
  _paint(a, idx['asphalt'], _line_mask(smooth_noise(rng, shape, [500, 150]), road_width_px))
  ground = smooth_noise(rng, shape, [350, 120, 40])
  lake = np.clip((np.quantile(ground, rng.uniform(*lake_fraction)) - ground) * 8, 0, 1)
  river = _line_mask(smooth_noise(rng, shape, [700, 200]), rng.uniform(*river_width_px))
  _paint(a, idx['water'], np.maximum(lake, river * (rng.uniform() < river_probability)))

  # Sub-pixel mixing at cover edges, as a 10 m sensor sees them: a 2x2 box filter.
  a[:, 1:] = 0.5 * (a[:, 1:] + a[:, :-1])
  a[:, :, 1:] = 0.5 * (a[:, :, 1:] + a[:, :, :-1])
  return a / a.sum(axis=0, keepdims=True)


def _paint(a, index, alpha):
  """Overlays cover `index` with opacity alpha (H, W) in [0, 1] on abundances a."""
  a *= 1 - alpha
  a[index] += alpha


def render(rng, abundances, *, texture=0.04, canopy_texture=0.12, band_noise=0.003,
           haze=(0.0, 1.0)):
  """Renders abundances to TOA digital numbers.

  Args:
    rng: np.random.Generator.
    abundances: (len(COVERS), H, W) float32, summing to 1 per pixel.
    texture: std of the per-pixel multiplicative texture (all bands, all covers).
    canopy_texture: extra texture std where there is forest (tree crowns, shadows).
    band_noise: std of per-pixel, per-band additive reflectance (sensor noise).
    haze: (low, high) range of the scene's haze strength (multiplies HAZE).

  Returns:
    (13, H, W) uint16, band-first as GeoTIFFs store it: TOA reflectance x 10000 in
    band order layout.BAND_NAMES.
  """
  k, h, w = abundances.shape
  spectra = np.asarray([SPECTRA[c] for c in COVERS], np.float32)  # (K, 13)
  image = (spectra.T @ abundances.reshape(k, -1)).reshape(-1, h, w)
  forest = abundances[COVERS.index('forest')]
  grain = smooth_noise(rng, (h, w), [2, 0.7])
  image *= 1 + (texture + canopy_texture * forest) * grain
  strength = rng.uniform(*haze) * (1 + 0.3 * smooth_noise(rng, (h, w), [400]))
  image += HAZE[:, None, None] * strength
  image += band_noise * rng.standard_normal(image.shape, dtype=np.float32)
  dn = np.clip(image * layout.REFLECTANCE_SCALE, 1, np.iinfo(layout.PATCH_DTYPE).max)
  return np.round(dn).astype(layout.PATCH_DTYPE)


def scene(rng, shape):
  """A random (13, H, W) uint16 TOA scene (see land_cover and render)."""
  return render(rng, land_cover(rng, shape))
