"""Tests of the `sen12ms` TFDS builder on synthetic SEN12MS files (tree and archive).

Every example is checked against what rasterio reads from its source file; bad inputs
must raise a Sen12msError naming the file and leave no complete-looking dataset.
"""

import pathlib
import shutil
import tarfile

import numpy as np
import pytest
import rasterio
import rasterio.crs
import rasterio.transform
import tensorflow_datasets as tfds

import tfds_sen12ms
from tfds_sen12ms import build
from tfds_sen12ms import layout
from tfds_sen12ms import sen12ms
from tfds_sen12ms import synthetic

SEASON = layout.SUMMER
SCENES = (7, 15, 30)  # 15 is a hold-out scene: both splits are non-empty.
PATCHES_PER_SCENE = 4


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
  """A synthetic manual dir in the unpacked layout; returns (root, sorted tif paths)."""
  root = tmp_path_factory.mktemp('manual_tree')
  paths = synthetic.write_season(root, len(SCENES), PATCHES_PER_SCENE, seed=1,
                                 scene_ids=list(SCENES))
  return root, sorted(paths)


@pytest.fixture(scope='module')
def archive_dir(tree, tmp_path_factory):
  root = tmp_path_factory.mktemp('manual_archive')
  synthetic.pack_archive(tree[0], SEASON, root / layout.archive_name(SEASON))
  return root


def _copy_tree(tree, tmp_path):
  manual = tmp_path / 'manual'
  shutil.copytree(tree[0], manual)
  return manual


def _build(manual_dir, data_dir, config='summer_rgb', **kwargs):
  return build.build(manual_dir, data_dir, config, num_workers=kwargs.pop('num_workers', 0),
                     progress=False, **kwargs)


def _text(value):
  return value.decode() if isinstance(value, bytes) else value


def _check_dataset(data_dir, config, tif_paths):
  """Asserts each split holds exactly its scenes' files, each equal to rasterio's read."""
  bands = {c.name: c.bands for c in sen12ms.Sen12ms.BUILDER_CONFIGS}[config]
  indexes = [layout.BAND_NAMES.index(b) + 1 for b in bands]
  by_name = {p.name: p for p in tif_paths}
  seen = {}
  for split in ('train', 'test'):
    source = tfds.data_source(f'sen12ms/{config}', data_dir=data_dir, split=split)
    for i in range(len(source)):
      example = source[i]
      name = _text(example['file_name'])
      path = by_name[name]
      seen[name] = split
      with rasterio.open(path) as src:
        expected = src.read(indexes).transpose(1, 2, 0)
        assert _text(example['crs']) and rasterio.crs.CRS.from_string(
            _text(example['crs'])) == src.crs
        assert tuple(example['transform']) == tuple(src.transform)[:6]
      assert example['image'].dtype == np.uint16
      np.testing.assert_array_equal(example['image'], expected)
      scene = int(path.parent.name.removeprefix('s2_'))
      patch = int(path.stem.rsplit('_p', 1)[1])
      assert (int(example['scene_id']), int(example['patch_id'])) == (scene, patch)
      assert split == ('test' if scene in layout.SUMMER_TEST_SCENES else 'train')
  assert set(seen) == set(by_name)  # Every file exactly once (keys are unique).
  assert set(seen.values()) == {'train', 'test'}


def test_rgb_band_indexes():
  assert layout.band_indexes(layout.RGB_BANDS) == (4, 3, 2)
  assert layout.band_indexes(('B8A', 'B12')) == (9, 13)


def test_build_from_tree_matches_rasterio(tree, tmp_path):
  builder = _build(tree[0], tmp_path / 'tfds')
  assert builder.info.splits['train'].num_examples == 8
  assert builder.info.splits['test'].num_examples == 4
  _check_dataset(tmp_path / 'tfds', 'summer_rgb', tree[1])


def test_build_from_archive_all_bands_in_workers(tree, archive_dir, tmp_path):
  assert not (archive_dir / SEASON).exists()  # Streamed, not unpacked.
  _build(archive_dir, tmp_path / 'tfds', 'summer_all', num_workers=2)
  _check_dataset(tmp_path / 'tfds', 'summer_all', tree[1])
  assert not (archive_dir / SEASON).exists()


def test_default_config_is_the_studys():
  assert sen12ms.Sen12ms.DEFAULT_BUILDER_CONFIG_NAME == 'summer_rgb'
  assert tfds_sen12ms.Sen12ms.BUILDER_CONFIGS[0].bands == ('B04', 'B03', 'B02')


def _assert_fails_cleanly(manual_dir, data_dir, *must_contain):
  with pytest.raises(tfds_sen12ms.Sen12msError) as error:
    _build(manual_dir, data_dir)
  for text in must_contain:
    assert str(text) in str(error.value)
  # TFDS renames its temporary folder only on success: nothing complete-looking.
  assert not (pathlib.Path(data_dir) / 'sen12ms' / 'summer_rgb' /
              str(sen12ms.Sen12ms.VERSION)).exists()
  assert not list(pathlib.Path(data_dir).rglob('dataset_info.json'))
  return str(error.value)


@pytest.mark.parametrize('make_empty', [False, True])
def test_missing_or_empty_manual_dir_prints_instructions(tmp_path, make_empty):
  manual = tmp_path / 'manual'
  if make_empty:
    manual.mkdir()
  _assert_fails_cleanly(manual, tmp_path / 'tfds', str(manual),
                        'ROIs1868_summer_s2.tar.gz', '10.14459/2019mp1474000')


def test_manual_dir_without_season_data(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  (manual / 'notes.txt').write_text('x')
  _assert_fails_cleanly(manual, tmp_path / 'tfds', 'notes.txt', 'ROIs1868_summer_s2.tar.gz')


def _first_tif(manual):
  return sorted((manual / SEASON).glob('s2_*/*.tif'))[0]


def test_truncated_tif(tree, tmp_path):
  manual = _copy_tree(tree, tmp_path)
  bad = _first_tif(manual)
  bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 3])
  _assert_fails_cleanly(manual, tmp_path / 'tfds', bad, 'skip_corrupt')


def test_not_a_geotiff(tree, tmp_path):
  manual = _copy_tree(tree, tmp_path)
  bad = _first_tif(manual)
  bad.write_text('this is not an image')
  _assert_fails_cleanly(manual, tmp_path / 'tfds', bad, 'GeoTIFF')


def _rewrite(path, count=13, size=layout.PATCH_SIZE, dtype='uint16'):
  with rasterio.open(path, 'w', driver='GTiff', width=size, height=size, count=count,
                     dtype=dtype, crs='EPSG:32633',
                     transform=rasterio.transform.Affine(10, 0, 5e5, 0, -10, 5e6)) as dst:
    dst.write(np.ones((count, size, size), dtype))


@pytest.mark.parametrize('kwargs, text', [
    (dict(count=3), 'has 3 bands'),
    (dict(size=128), '128x128 px'),
    (dict(dtype='float32'), 'dtype float32'),
])
def test_wrong_band_count_size_or_dtype(tree, tmp_path, kwargs, text):
  manual = _copy_tree(tree, tmp_path)
  bad = _first_tif(manual)
  _rewrite(bad, **kwargs)
  _assert_fails_cleanly(manual, tmp_path / 'tfds', bad, text)


def test_file_name_off_pattern(tree, tmp_path):
  manual = _copy_tree(tree, tmp_path)
  bad = manual / SEASON / 's2_7' / 'patch_7_copy.tif'
  shutil.copy(_first_tif(manual), bad)
  _assert_fails_cleanly(manual, tmp_path / 'tfds', bad, 'does not match')


def test_truncated_archive(archive_dir, tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  archive = manual / layout.archive_name(SEASON)
  data = (archive_dir / layout.archive_name(SEASON)).read_bytes()
  archive.write_bytes(data[:len(data) // 2])
  _assert_fails_cleanly(manual, tmp_path / 'tfds', archive, 'truncated')


def test_bad_patch_in_archive_names_member(tree, tmp_path):
  manual = _copy_tree(tree, tmp_path / 'src')
  bad = _first_tif(manual)
  _rewrite(bad, count=3)
  out = tmp_path / 'manual'
  out.mkdir()
  synthetic.pack_archive(manual, SEASON, out / layout.archive_name(SEASON))
  member = bad.relative_to(manual).as_posix()
  _assert_fails_cleanly(out, tmp_path / 'tfds', member, layout.archive_name(SEASON))


def test_skip_corrupt_reports_every_skipped_file(tree, tmp_path):
  manual = _copy_tree(tree, tmp_path)
  bad = _first_tif(manual)
  bad.write_text('garbage')
  misnamed = manual / SEASON / 's2_30' / 'extra.tif'
  shutil.copy(tree[1][-1], misnamed)
  builder = _build(manual, tmp_path / 'tfds', skip_corrupt=True)
  total = len(SCENES) * PATCHES_PER_SCENE
  sizes = [split.num_examples for split in builder.info.splits.values()]
  assert sum(sizes) == total - 1
  report = (builder.data_path / sen12ms.SKIPPED_FILES_NAME).read_text().splitlines()
  assert len(report) == 2 == len(builder.skipped)
  assert any(str(bad) in line for line in report)
  assert any(str(misnamed) in line for line in report)
  good = [p for p in tree[1] if p.name != bad.name]
  _check_dataset_subset(tmp_path / 'tfds', good)


def _check_dataset_subset(data_dir, tif_paths):
  names = set()
  for split in ('train', 'test'):
    source = tfds.data_source('sen12ms/summer_rgb', data_dir=data_dir, split=split)
    names |= {_text(source[i]['file_name']) for i in range(len(source))}
  assert names == {p.name for p in tif_paths}


def test_build_command_exit_status(tree, tmp_path, capsys):
  assert build.main([f'--manual_dir={tmp_path / "none"}', f'--data_dir={tmp_path}',
                     '--num_workers=0']) == 1
  assert 'mediatum' in capsys.readouterr().err.lower()


def test_split_without_patches(tmp_path):
  manual = tmp_path / 'manual'
  synthetic.write_season(manual, 0, 1, scene_ids=[7])  # No hold-out scene.
  _assert_fails_cleanly(manual, tmp_path / 'tfds', "split 'test' has no", '15, 19')
