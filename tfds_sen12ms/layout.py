"""The SEN12MS Sentinel-2 layout on disk: names, bands, patch shape, hold-out scenes.

One place for the facts that the builder checks and the synthetic generator writes:
`<root>/<season>/s2_<scene>/<season>_s2_<scene>_p<patch>.tif`, 13-band uint16 GeoTIFFs
of 256x256 px (TOA reflectance x 10000), packed as `<season>_s2.tar.gz` on mediaTUM.
"""

import dataclasses
import re

import numpy as np

# Sentinel-2 L1C band order inside every SEN12MS s2 file (B8A is the 9th band).
BAND_NAMES = ('B01', 'B02', 'B03', 'B04', 'B05', 'B06', 'B07', 'B08', 'B8A',
              'B09', 'B10', 'B11', 'B12')
RGB_BANDS = ('B04', 'B03', 'B02')
PATCH_SIZE = 256  # Pixels per side of every patch.
PATCH_DTYPE = np.uint16
PIXEL_SIZE_M = 10.0  # Ground sampling distance of the 10 m grid all bands share.
REFLECTANCE_SCALE = 10000  # Digital number = TOA reflectance x this.

SUMMER = 'ROIs1868_summer'
SEASONS = ('ROIs1158_spring', SUMMER, 'ROIs1970_fall', 'ROIs2017_winter')
# The official hold-out (test) scenes of the summer season.
SUMMER_TEST_SCENES = (15, 19, 43, 72, 79, 104, 131)

SCENE_DIR_PREFIX = 's2_'
TIF_SUFFIX = '.tif'
_FILE_NAME_RE = re.compile(r'^(?P<season>ROIs\d+_[a-z]+)_s2_(?P<scene>\d+)_p(?P<patch>\d+)\.tif$')
_SCENE_DIR_RE = re.compile(r'^s2_(?P<scene>\d+)$')


class Sen12msError(ValueError):
  """A SEN12MS input is missing or malformed; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class PatchName:
  """The identity of one patch, parsed from its path."""
  season: str
  scene_id: int
  patch_id: int
  file_name: str  # Base name, e.g. 'ROIs1868_summer_s2_15_p33.tif'.


def band_indexes(bands):
  """Returns rasterio's 1-based band indexes for band names, e.g. RGB -> (4, 3, 2)."""
  unknown = [b for b in bands if b not in BAND_NAMES]
  if unknown:
    raise Sen12msError(f'Unknown Sentinel-2 band(s) {unknown}; use names from {BAND_NAMES}.')
  return tuple(BAND_NAMES.index(b) + 1 for b in bands)


def archive_name(season):
  """The mediaTUM archive of a season's Sentinel-2 patches, e.g. ROIs1868_summer_s2.tar.gz."""
  return f'{season}_s2.tar.gz'


def file_name(season, scene_id, patch_id):
  """The base name of a patch file."""
  return f'{season}_s2_{scene_id}_p{patch_id}{TIF_SUFFIX}'


def relative_path(season, scene_id, patch_id):
  """The patch's path relative to the root: '<season>/s2_<scene>/<file name>'."""
  return f'{season}/{SCENE_DIR_PREFIX}{scene_id}/{file_name(season, scene_id, patch_id)}'


def parse_path(path, season, display=None):
  """Parses '<...>/<season>/s2_<scene>/<season>_s2_<scene>_p<patch>.tif'.

  Args:
    path: a path (str, '/'-separated; tree file or archive member name).
    season: the season the builder reads, e.g. 'ROIs1868_summer'.
    display: how messages name the file (default: path).

  Returns:
    The PatchName.

  Raises:
    Sen12msError: if the name, its scene folder or its season do not match the layout.
  """
  parts = str(path).replace('\\', '/').split('/')
  base = parts[-1]
  where = repr(str(display or path))
  match = _FILE_NAME_RE.match(base)
  if not match:
    raise Sen12msError(
        f'{where}: file name does not match "<season>_s2_<scene>_p<patch>.tif"; remove or '
        'rename it (only unmodified SEN12MS s2 patches belong under the season folder).')
  dir_match = _SCENE_DIR_RE.match(parts[-2]) if len(parts) >= 2 else None
  if not dir_match or int(dir_match['scene']) != int(match['scene']):
    raise Sen12msError(
        f'{where}: expected it inside folder "s2_{int(match["scene"])}"; restore the '
        'archive\'s layout <season>/s2_<scene>/<file>.')
  if match['season'] != season or len(parts) < 3 or parts[-3] != season:
    raise Sen12msError(
        f'{where}: not a patch of season {season}; keep each season in its own folder.')
  return PatchName(season=season, scene_id=int(match['scene']),
                   patch_id=int(match['patch']), file_name=base)
