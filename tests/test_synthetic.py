"""Tests of the synthetic SEN12MS generator: the real layout and metadata, geometric
consistency between overlapping patches, plausible spectra and terrain-like structure."""

import tarfile

import numpy as np
import pytest
import rasterio
import rasterio.io

from tfds_sen12ms import layout
from tfds_sen12ms import synthetic
from tfds_sen12ms import terrain

SCENES = [3, 19]
PATCHES = 8


@pytest.fixture(scope='module')
def season(tmp_path_factory):
  root = tmp_path_factory.mktemp('synthetic')
  return root, synthetic.write_season(root, 0, PATCHES, seed=3, scene_ids=SCENES)


def test_layout_names_and_file_format(season):
  root, paths = season
  assert len(paths) == len(SCENES) * PATCHES
  for path in paths:
    name = layout.parse_path(path.relative_to(root).as_posix(), layout.SUMMER)
    assert path == root / layout.relative_path(layout.SUMMER, name.scene_id, name.patch_id)
    with rasterio.open(path) as src:
      assert (src.driver, src.count, src.height, src.width) == ('GTiff', 13, 256, 256)
      assert set(src.dtypes) == {'uint16'}
      assert 32601 <= src.crs.to_epsg() <= 32660  # UTM north.
      t = src.transform
      assert (t.a, t.b, t.d, t.e) == (10.0, 0.0, 0.0, -10.0)  # 10 m, north-up.


def test_patch_ids_sparse_and_transforms_distinct(season):
  root, paths = season
  for scene in SCENES:
    ids = sorted(int(p.stem.rsplit('_p', 1)[1]) for p in paths if f's2_{scene}/' in p.as_posix())
    assert len(ids) == PATCHES and ids != list(range(ids[0], ids[0] + PATCHES))
    origins = set()
    for p in paths:
      if f'/s2_{scene}/' in p.as_posix():
        with rasterio.open(p) as src:
          origins.add((src.transform.c, src.transform.f))
    assert len(origins) == PATCHES


def test_overlapping_patches_agree_where_their_footprints_overlap(season):
  """Patches are cut from one georeferenced mosaic: shared ground has equal pixels."""
  _, paths = season
  scene_paths = [p for p in paths if '/s2_3/' in p.as_posix()]
  checked = 0
  for i, p in enumerate(scene_paths):
    for q in scene_paths[i + 1:]:
      with rasterio.open(p) as a, rasterio.open(q) as b:
        dx = round((b.transform.c - a.transform.c) / 10)
        dy = round((a.transform.f - b.transform.f) / 10)
        if abs(dx) >= 256 or abs(dy) >= 256:
          continue
        x, y = a.read(), b.read()
        ya, xa = max(dy, 0), max(dx, 0)
        yb, xb = max(-dy, 0), max(-dx, 0)
        h, w = 256 - abs(dy), 256 - abs(dx)
        np.testing.assert_array_equal(x[:, ya:ya + h, xa:xa + w], y[:, yb:yb + h, xb:xb + w])
        checked += 1
  assert checked > 0


def test_default_scene_ids_cover_both_splits():
  for n in (2, 5, 16):
    ids = synthetic.default_scene_ids(n, seed=0)
    test = [s for s in ids if s in layout.SUMMER_TEST_SCENES]
    assert len(ids) == len(set(ids)) == n
    assert 1 <= len(test) < n


def test_pure_cover_renders_its_spectrum():
  shape = (8, 8)
  for i, cover in enumerate(terrain.COVERS):
    abundances = np.zeros((len(terrain.COVERS),) + shape, np.float32)
    abundances[i] = 1
    dn = terrain.render(np.random.default_rng(0), abundances, texture=0, canopy_texture=0,
                        band_noise=0, haze=(0, 0))
    expected = np.round(np.asarray(terrain.SPECTRA[cover]) * 10000)
    np.testing.assert_allclose(dn[:, 0, 0], np.maximum(expected, 1), atol=1)


def test_spectra_are_plausible_toa_reflectance():
  b = {name: i for i, name in enumerate(layout.BAND_NAMES)}
  crop, water, soil = (np.asarray(terrain.SPECTRA[c]) for c in ('crop', 'water', 'soil'))
  assert 0.03 <= crop[b['B04']] <= 0.05 and 0.3 <= crop[b['B08']] <= 0.4
  assert water[b['B08']] <= 0.02 and water.max() < 0.12
  assert soil[b['B02']] < soil[b['B04']] < soil[b['B11']]


def test_rgb_looks_like_terrain_not_noise(season):
  """After the study's preprocessing: spatially coherent, varied, with NDVI contrast."""
  _, paths = season
  coherence, ndvi_spread = [], []
  for path in paths[::4]:
    with rasterio.open(path) as src:
      image = src.read().astype(np.float64)
    rgb = np.clip(image[[3, 2, 1]] / 5000, 0, 1) ** (1 / 2.2)
    gray = rgb.mean(axis=0)
    # Neighbour correlation: ~0 for white noise, near 1 for terrain.
    coherence.append(np.corrcoef(gray[:, :-1].ravel(), gray[:, 1:].ravel())[0, 1])
    ndvi = (image[7] - image[3]) / (image[7] + image[3])
    ndvi_spread.append(np.percentile(ndvi, 90) - np.percentile(ndvi, 10))
    assert gray.std() > 0.01
  assert np.median(coherence) > 0.6
  assert max(ndvi_spread) > 0.3


def test_archive_holds_the_tree(tmp_path):
  paths = synthetic.write_season(tmp_path / 'tree', 0, 2, seed=0, scene_ids=[15])
  archive = synthetic.write_season(tmp_path / 'arch', 0, 2, seed=0, scene_ids=[15],
                                   archive=True)
  assert archive.name == 'ROIs1868_summer_s2.tar.gz'
  assert not (tmp_path / 'arch' / layout.SUMMER).exists()
  with tarfile.open(archive, 'r:gz') as tar:
    members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
  for path in paths:
    with rasterio.open(path) as src, rasterio.io.MemoryFile(
        members[path.relative_to(tmp_path / 'tree').as_posix()]) as mem, mem.open() as arc:
      np.testing.assert_array_equal(src.read(), arc.read())


def test_command_writes_archive_and_preview(tmp_path):
  preview = tmp_path / 'preview.png'
  synthetic.main([f'--out_dir={tmp_path / "out"}', '--num_scenes=2', '--patches_per_scene=2',
                  '--archive', f'--preview={preview}'])
  assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['ROIs1868_summer_s2.tar.gz']
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(preview) as image:
    assert image.size == (4 * layout.PATCH_SIZE, layout.PATCH_SIZE)
    pixels = np.asarray(image)
  assert pixels.std() > 5  # Not blank.
  with tarfile.open(tmp_path / 'out' / 'ROIs1868_summer_s2.tar.gz') as tar:
    names = [m.name for m in tar if m.isfile()]
  assert len(names) == 4 and all(n.startswith('ROIs1868_summer/s2_') for n in names)
