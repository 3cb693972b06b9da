"""The TFDS builder `sen12ms`: SEN12MS Sentinel-2 L1C patches, one config per season and
band set, built without TensorFlow into array_record files.

Download (manual; CC-BY-4.0): from mediaTUM, https://mediatum.ub.tum.de/1474000
(DOI 10.14459/2019mp1474000), fetch `ROIs1868_summer_s2.tar.gz` and put it,
as is or unpacked (`ROIs1868_summer/s2_<scene>/*.tif`), into a manual dir. The archive is
streamed (never unpacked to disk); the unpacked tree builds faster.

Build (TensorFlow is not needed; `tfds build` would need it):

  python -m tfds_sen12ms.build --manual_dir=~/sen12ms --data_dir=data/tfds \
      [--config=summer_rgb] [--num_workers=N] [--skip_corrupt]

Load (random access, numpy):

  import tensorflow_datasets as tfds, tfds_sen12ms
  source = tfds.data_source('sen12ms/summer_rgb', data_dir='data/tfds', split='train')
  example = source[0]  # image (256, 256, 3) uint16 [0, 65535] HWC (B04, B03, B02),
                       # scene_id, patch_id, file_name, crs, transform (6,) float64.

Splits: `train` = every summer scene but the official hold-out scenes
15, 19, 43, 72, 79, 104, 131, which form `test`. The summer season has 45,753 patches
in all (the study's count); their division between the splits follows from the hold-out
scenes' patch counts, which the build prints and stores in dataset_info.json.

Corrupt input: by default the first bad patch (unreadable or non-GeoTIFF file, wrong
band count / size / dtype, a name off the SEN12MS pattern) stops the build with a
`Sen12msError` naming the file, and no dataset version folder is left (TFDS writes into
a temporary folder and renames it only on success). With `skip_corrupt=True` bad
patches are left out instead; their number is logged and `skipped_files.txt` (one
'<file>: <reason>' per line) is written into the dataset version folder. A truncated
archive always stops the build: what follows the break is unreadable.
"""

import dataclasses
import logging

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from tfds_sen12ms import layout
from tfds_sen12ms import reader

SKIPPED_FILES_NAME = 'skipped_files.txt'
FILE_FORMAT = 'array_record'  # The format readable without TensorFlow.

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
SEN12MS is a manual download (CC-BY-4.0). From mediaTUM,
https://mediatum.ub.tum.de/1474000 (DOI 10.14459/2019mp1474000), download the season's
Sentinel-2 archive, for the summer season `ROIs1868_summer_s2.tar.gz`, and put it into
the manual dir (passed as --manual_dir, or `<data_dir>/downloads/manual/`), either as is:
  <manual_dir>/ROIs1868_summer_s2.tar.gz          (streamed; never unpacked to disk)
or unpacked (`tar -xzf ROIs1868_summer_s2.tar.gz -C <manual_dir>`):
  <manual_dir>/ROIs1868_summer/s2_<scene>/ROIs1868_summer_s2_<scene>_p<patch>.tif
Other seasons: the same with ROIs1158_spring, ROIs1970_fall or ROIs2017_winter.
For a synthetic stand-in: python -m tfds_sen12ms.synthetic --out_dir=<manual_dir>
"""


@dataclasses.dataclass(eq=False)
class Sen12msConfig(tfds.core.BuilderConfig):
  """A season and the bands kept, in output channel order."""
  season: str = layout.SUMMER
  bands: tuple[str, ...] = layout.RGB_BANDS
  # Scenes of the `test` split (the official hold-out); all others are `train`.
  test_scenes: tuple[int, ...] = layout.SUMMER_TEST_SCENES


class Sen12ms(tfds.core.GeneratorBasedBuilder):
  """SEN12MS Sentinel-2 patches (see the module docstring for download/build/load)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Raw uint16 patches, hold-out test split, geo metadata.',
      '1.1.0': 'Patches stored as raw bytes, not zlib: array_record compresses each '
               'record itself, so zlib only tripled the read cost (same size on disk).',
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  # A new season is one more entry here (with its hold-out scenes).
  BUILDER_CONFIGS = [
      Sen12msConfig(name='summer_rgb', description='Summer, B04/B03/B02 (the study).',
                    season=layout.SUMMER, bands=layout.RGB_BANDS,
                    test_scenes=layout.SUMMER_TEST_SCENES),
      Sen12msConfig(name='summer_all', description='Summer, all 13 bands B01..B12.',
                    season=layout.SUMMER, bands=layout.BAND_NAMES,
                    test_scenes=layout.SUMMER_TEST_SCENES),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = 'summer_rgb'

  def __init__(self, *, num_workers=0, skip_corrupt=False, progress=False,
               file_format=FILE_FORMAT, **kwargs):
    """Args: num_workers: reader processes (<= 1: in this process); skip_corrupt:
    leave bad patches out (listed in skipped_files.txt) instead of stopping;
    progress: a tqdm bar per split; others: tfds.core.GeneratorBasedBuilder's."""
    super().__init__(file_format=file_format, **kwargs)
    self._num_workers = num_workers
    self._skip_corrupt = skip_corrupt
    self._progress = progress
    self._pool = None  # Set while _download_and_prepare runs with num_workers > 1.
    self.skipped = []  # '<file>: <reason>' for each patch left out by skip_corrupt.

  def _info(self):
    num_bands = len(self.builder_config.bands)
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            # Raw bytes: TFDS's array_record writer already compresses every record,
            # so zlib on top saved nothing on disk (133 vs 134 MB for 480 patches)
            # and cost 2 ms of the 3 ms a read took (bench/RESULTS.md).
            'image': tfds.features.Tensor(
                shape=(layout.PATCH_SIZE, layout.PATCH_SIZE, num_bands),
                dtype=layout.PATCH_DTYPE, encoding='bytes'),
            'scene_id': tfds.features.Scalar(dtype=np.int32),
            'patch_id': tfds.features.Scalar(dtype=np.int32),
            'file_name': tfds.features.Text(),
            'crs': tfds.features.Text(),
            'transform': tfds.features.Tensor(shape=(6,), dtype=np.float64),
        }),
        homepage='https://mediatum.ub.tum.de/1474000',
        citation='Schmitt et al., SEN12MS, ISPRS Annals 2019, doi:10.14459/2019mp1474000',
        description=f'SEN12MS {self.builder_config.season} Sentinel-2 L1C patches, bands '
                    f'{", ".join(self.builder_config.bands)}, TOA reflectance x 10000.',
    )

  def _split_generators(self, dl_manager):
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError as e:  # TFDS's "does not exist or is empty".
      raise layout.Sen12msError(
          f'{e.args[0].split(". ")[0]}.\n\n{MANUAL_DOWNLOAD_INSTRUCTIONS}') from e
    season = self.builder_config.season
    source = reader.find_source(manual_dir, season, MANUAL_DOWNLOAD_INSTRUCTIONS)
    test_scenes = frozenset(self.builder_config.test_scenes)
    self.skipped = []
    # Badly named files belong to no split: the train pass reports them once.
    return {
        'train': self._generate_examples(
            source, lambda n: n is None or n.scene_id not in test_scenes, 'train'),
        'test': self._generate_examples(
            source, lambda n: n is not None and n.scene_id in test_scenes, 'test'),
    }

  def _generate_examples(self, source, keep, split):
    season = self.builder_config.season
    tasks = (reader.tree_tasks if source.kind == reader.TREE else reader.archive_tasks)(
        source, season, keep)
    read = _PatchReader(layout.band_indexes(self.builder_config.bands))
    results = reader.ordered_map(read, tasks, self._pool)
    if self._progress:
      results = tqdm.tqdm(results, unit=' patches', desc=self.builder_config.name)
    count = 0
    for example, error in results:
      if error is not None:
        if not self._skip_corrupt:
          raise layout.Sen12msError(
              f'{error}\n(Or build with skip_corrupt / --skip_corrupt to leave bad '
              f'patches out, listed in {SKIPPED_FILES_NAME}.)')
        logging.warning('Skipping %s', error)
        self.skipped.append(error)
        continue
      count += 1
      # The file name is unique per season and stable: deterministic keys.
      yield example['file_name'], example
    if not count:  # TFDS would fail later with a bare "No examples were yielded".
      scenes = f'the hold-out scenes {self.builder_config.test_scenes}' if split == 'test' \
          else 'any scene outside the hold-out list'
      raise layout.Sen12msError(
          f'{source.path}: split {split!r} has no readable patches: the data holds none '
          f'of {scenes}. The full season has both; check that the download is complete '
          '(for synthetic data, include such a scene with --scene_ids).')

  def _download_and_prepare(self, dl_manager, download_config=None):
    with reader.worker_pool(self._num_workers) as self._pool:
      try:
        super()._download_and_prepare(dl_manager=dl_manager,
                                      download_config=download_config)
      finally:
        self._pool = None
    if self.skipped:
      # self.data_dir is still TFDS's temporary folder here: the report is renamed
      # into place together with the dataset.
      report = self.data_path / SKIPPED_FILES_NAME
      report.write_text(''.join(line.replace('\n', ' ') + '\n' for line in self.skipped))
      logging.warning('Skipped %d corrupt patch(es); see %s', len(self.skipped),
                      SKIPPED_FILES_NAME)


class _PatchReader:
  """A picklable `reader.read_task` bound to the band indexes (for worker processes)."""

  def __init__(self, band_indexes):
    self.band_indexes = band_indexes

  def __call__(self, task):
    return reader.read_task(task, self.band_indexes)
