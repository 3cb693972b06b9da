"""A synthetic SEN12MS season in the real layout: procedural terrain (terrain.py) cut
into 256x256 13-band uint16 GeoTIFF patches, optionally packed as the mediaTUM archive.

  python -m tfds_sen12ms.synthetic --out_dir=DIR --num_scenes=N --patches_per_scene=M \
      [--archive] [--seed=0] [--season=ROIs1868_summer] [--preview=/tmp/preview.png]

writes <out_dir>/<season>/s2_<scene>/<season>_s2_<scene>_p<patch>.tif (or, with
--archive, only <out_dir>/<season>_s2.tar.gz). Like SEN12MS, each scene is a UTM
mosaic tiled with a stride of half a patch; some grid positions are dropped, so patch
ids are not contiguous. Default scene ids mix hold-out and train scenes.
"""

import argparse
import math
import pathlib
import shutil
import tarfile

import numpy as np
import rasterio
import rasterio.crs
import rasterio.transform

from tfds_sen12ms import layout
from tfds_sen12ms import terrain

STRIDE = layout.PATCH_SIZE // 2  # SEN12MS tiles scenes with 50% overlap.
KEPT_FRACTION = 2 / 3  # Share of grid positions kept as patches (ids become sparse).
MAX_SCENE_ID = 150  # Summer scene ids lie in 1..149.
UTM_ZONES = range(29, 38)  # Central Europe; northern hemisphere: EPSG 326xx.
UTM_NORTH_EPSG = 32600
EASTING_RANGE_M = (300_000, 700_000)
NORTHING_RANGE_M = (4_500_000, 6_000_000)
ARCHIVE_COMPRESSLEVEL = 1  # Fast gzip: the tifs are already zlib-compressed.


def default_scene_ids(num_scenes, seed=0, test_scenes=layout.SUMMER_TEST_SCENES):
  """Scene ids with about one hold-out scene in eight (at least one if num_scenes >= 2).

  Returns:
    A sorted list of num_scenes distinct ids in [1, MAX_SCENE_ID).
  """
  num_test = min(len(test_scenes), max(1 if num_scenes >= 2 else 0, round(num_scenes / 8)))
  rng = np.random.default_rng(seed)
  train_pool = [s for s in range(1, MAX_SCENE_ID) if s not in test_scenes]
  train = rng.choice(train_pool, num_scenes - num_test, replace=False)
  return sorted(int(s) for s in list(test_scenes[:num_test]) + list(train))


def write_scene(out_dir, season, scene_id, num_patches, rng):
  """Renders one scene and writes its patches.

  Args:
    out_dir: the root; files go to <out_dir>/<season>/s2_<scene>/.
    season: e.g. 'ROIs1868_summer'.
    scene_id: the scene's id.
    num_patches: patches to write.
    rng: np.random.Generator.

  Returns:
    The written paths, sorted by patch id.
  """
  positions = math.ceil(num_patches / KEPT_FRACTION)
  cols = math.ceil(math.sqrt(positions))
  rows = math.ceil(positions / cols)
  shape = ((rows - 1) * STRIDE + layout.PATCH_SIZE, (cols - 1) * STRIDE + layout.PATCH_SIZE)
  image = terrain.scene(rng, shape)  # (13, H, W) uint16.
  kept = np.sort(rng.choice(rows * cols, num_patches, replace=False))
  crs = rasterio.crs.CRS.from_epsg(UTM_NORTH_EPSG + int(rng.choice(UTM_ZONES)))
  step = layout.PIXEL_SIZE_M
  west = round(rng.uniform(*EASTING_RANGE_M) / step) * step
  north = round(rng.uniform(*NORTHING_RANGE_M) / step) * step
  folder = pathlib.Path(out_dir) / season / f'{layout.SCENE_DIR_PREFIX}{scene_id}'
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for position in kept:
    r, c = divmod(int(position), cols)
    y, x = r * STRIDE, c * STRIDE
    # North-up 10 m grid: (a, b, c, d, e, f) = (step, 0, west edge, 0, -step, north edge).
    transform = rasterio.transform.Affine(step, 0.0, west + x * step,
                                          0.0, -step, north - y * step)
    path = folder / layout.file_name(season, scene_id, int(position) + 1)  # 1-based ids.
    with rasterio.open(
        path, 'w', driver='GTiff', width=layout.PATCH_SIZE, height=layout.PATCH_SIZE,
        count=len(layout.BAND_NAMES), dtype=np.dtype(layout.PATCH_DTYPE).name, crs=crs,
        transform=transform, compress='deflate', predictor=2, zlevel=1) as dst:
      dst.write(image[:, y:y + layout.PATCH_SIZE, x:x + layout.PATCH_SIZE])
      dst.descriptions = layout.BAND_NAMES
    paths.append(path)
  return paths


def write_season(out_dir, num_scenes, patches_per_scene, *, seed=0, season=layout.SUMMER,
                 scene_ids=None, archive=False):
  """Writes a synthetic season (see the module docstring).

  Args:
    out_dir: the output root.
    num_scenes: number of scenes (ignored if scene_ids is given).
    patches_per_scene: patches per scene.
    seed: drives scene ids, terrain and georeferencing.
    season: season folder name.
    scene_ids: explicit scene ids (default: default_scene_ids).
    archive: pack into <out_dir>/<season>_s2.tar.gz and remove the tree.

  Returns:
    The archive path if archive, else the sorted written .tif paths.
  """
  scene_ids = scene_ids or default_scene_ids(num_scenes, seed)
  rng = np.random.default_rng(seed)
  paths = []
  for scene_id in scene_ids:
    paths += write_scene(out_dir, season, scene_id, patches_per_scene, rng)
  if not archive:
    return paths
  path = pack_archive(out_dir, season, pathlib.Path(out_dir) / layout.archive_name(season))
  shutil.rmtree(pathlib.Path(out_dir) / season)
  return path


def pack_archive(root, season, archive_path):
  """Packs <root>/<season>/ into a .tar.gz with the archive's member names.

  Returns:
    archive_path.
  """
  root = pathlib.Path(root)
  with tarfile.open(archive_path, 'w:gz', compresslevel=ARCHIVE_COMPRESSLEVEL) as tar:
    for path in sorted((root / season).rglob('*')):
      tar.add(path, arcname=path.relative_to(root).as_posix(), recursive=False)
  return archive_path


def save_preview(paths, out_png, *, dn_scale=5000.0, gamma=2.2, columns=4):
  """Saves an RGB grid of patches after the study's preprocessing (DN/5000, clip, gamma).

  Args:
    paths: .tif patches (up to a few dozen).
    out_png: the PNG to write.
    dn_scale, gamma: the study's DN divisor and gamma.
    columns: patches per row.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  tiles = []
  for path in paths:
    with rasterio.open(path) as src:
      rgb = src.read(list(layout.band_indexes(layout.RGB_BANDS))).transpose(1, 2, 0)
    tiles.append((np.clip(rgb / dn_scale, 0, 1) ** (1 / gamma) * 255).astype(np.uint8))
  while len(tiles) % columns:
    tiles.append(np.zeros_like(tiles[0]))
  rows = [np.concatenate(tiles[i:i + columns], axis=1) for i in range(0, len(tiles), columns)]
  Image.fromarray(np.concatenate(rows, axis=0)).save(out_png)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out_dir', required=True)
  parser.add_argument('--num_scenes', type=int, default=4)
  parser.add_argument('--patches_per_scene', type=int, default=16)
  parser.add_argument('--archive', action='store_true', help='write only the .tar.gz')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--season', default=layout.SUMMER, choices=layout.SEASONS)
  parser.add_argument('--scene_ids', type=lambda s: [int(x) for x in s.split(',')],
                      default=None, help='comma-separated, e.g. 1,15,20')
  parser.add_argument('--preview', default='', help='PNG of a few RGB patches')
  args = parser.parse_args(argv)
  written = write_season(args.out_dir, args.num_scenes, args.patches_per_scene,
                         seed=args.seed, season=args.season, scene_ids=args.scene_ids,
                         archive=args.archive and not args.preview)
  if args.preview:
    save_preview(written[::max(1, len(written) // 8)][:8], args.preview)
    if args.archive:
      pack_archive(args.out_dir, args.season,
                   pathlib.Path(args.out_dir) / layout.archive_name(args.season))
      shutil.rmtree(pathlib.Path(args.out_dir) / args.season)
  print(f'Wrote {args.num_scenes if not args.scene_ids else len(args.scene_ids)} scenes x '
        f'{args.patches_per_scene} patches of {args.season} to {args.out_dir}'
        + (' (archive)' if args.archive else ''))


if __name__ == '__main__':
  main()
