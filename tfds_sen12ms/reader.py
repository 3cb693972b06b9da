"""Reading SEN12MS s2 patches: locating them in a manual dir (unpacked tree or the
`.tar.gz` archive, streamed), decoding and validating each patch, and reading many in
worker processes while keeping a fixed order.

Every problem is reported as a `layout.Sen12msError` that names the file and the fix.
"""

import collections
import contextlib
import dataclasses
import multiprocessing
import os
import pathlib
import tarfile
import zlib

import numpy as np
import rasterio
import rasterio.errors
import rasterio.io

from tfds_sen12ms import layout

TREE = 'tree'
ARCHIVE = 'archive'
# Patches in flight per worker: enough to hide latency, small enough that memory
# stays bounded (~1.7 MB per 13-band patch) when the archive streams faster than
# the writer consumes.
_IN_FLIGHT_PER_WORKER = 8
# Archive stream reads in 1 MiB blocks; the default 10 KiB makes gzip slow.
_STREAM_BUFFER_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a season's patches are: an unpacked tree root or the archive file."""
  kind: str  # TREE or ARCHIVE.
  path: pathlib.Path  # TREE: the <season> folder; ARCHIVE: the .tar.gz file.


@dataclasses.dataclass(frozen=True)
class Task:
  """One patch to read: `data` holds archive bytes, else `path` is read from disk.

  `error` is set instead when the patch is already known to be bad (e.g. its name).
  """
  display: str  # The file as the user knows it, for messages.
  name: layout.PatchName | None = None
  path: str | None = None
  data: bytes | None = None
  error: str | None = None


def find_source(manual_dir, season, instructions=''):
  """Finds the season's tree (preferred: random access) or its archive in manual_dir.

  Args:
    manual_dir: the manual download folder.
    season: e.g. 'ROIs1868_summer'.
    instructions: appended to the error when nothing is found.

  Returns:
    A Source.

  Raises:
    Sen12msError: if neither `<manual_dir>/<season>/s2_*` nor the archive exists.
  """
  manual_dir = pathlib.Path(manual_dir)
  tree = manual_dir / season
  if tree.is_dir() and any(p.is_dir() for p in tree.glob(layout.SCENE_DIR_PREFIX + '*')):
    return Source(TREE, tree)
  archive = manual_dir / layout.archive_name(season)
  if archive.is_file():
    return Source(ARCHIVE, archive)
  found = sorted(p.name for p in manual_dir.iterdir()) if manual_dir.is_dir() else []
  raise with_instructions(
      f'Manual dir {str(manual_dir)!r} holds neither {season}/s2_<scene>/*.tif nor '
      f'{layout.archive_name(season)} (found: {found[:10] or "nothing"}).', instructions)


def with_instructions(message, instructions):
  """A Sen12msError whose message ends with the download instructions."""
  if instructions:
    message = f'{message}\n\n{instructions.strip()}'
  return layout.Sen12msError(message)


def _name_or_error(display, member, season):
  """(PatchName, None) for a well-named member, else (None, message naming display)."""
  try:
    return layout.parse_path(member, season, display), None
  except layout.Sen12msError as e:
    return None, str(e)


def tree_tasks(source, season, keep):
  """Yields Tasks for the tree's patch files, sorted by (scene, patch).

  Args:
    source: a TREE Source.
    season: the season folder's name.
    keep: predicate on PatchName (the split filter); `None` receives bad names.
  """
  tasks = []
  for path in source.path.glob(layout.SCENE_DIR_PREFIX + '*/*'):
    # GDAL side-cars (.aux.xml) and other non-patch files are not patches.
    if not path.is_file() or not path.name.lower().endswith(layout.TIF_SUFFIX):
      continue
    member = f'{season}/{path.parent.name}/{path.name}'
    name, error = _name_or_error(str(path), member, season)
    if keep(name):
      tasks.append(Task(display=str(path), name=name, path=str(path), error=error))
  # Badly named files first (so a stopping build fails fast), then by scene and patch.
  tasks.sort(key=lambda t: (1, t.name.scene_id, t.name.patch_id) if t.name else (0, 0, 0))
  yield from tasks


def archive_tasks(source, season, keep):
  """Streams the archive once ('r|gz', no random access, nothing unpacked to disk).

  Yields Tasks in archive order, with member bytes for kept patches.

  Raises:
    Sen12msError: if the archive is not a gzip tar or ends early.
  """
  archive = str(source.path)
  last = 'its start'  # The last member reached, for the message if the stream breaks.
  try:
    with open(archive, 'rb', buffering=_STREAM_BUFFER_BYTES) as f, \
        tarfile.open(fileobj=f, mode='r|gz') as tar:
      for member in tar:
        if not member.isfile() or not member.name.lower().endswith(layout.TIF_SUFFIX):
          continue
        parts = member.name.split('/')
        if len(parts) < 2 or not parts[-2].startswith(layout.SCENE_DIR_PREFIX):
          continue  # Not an s2 patch (e.g. s1_ or lc_ folders of other archives).
        display = f'{archive}:{member.name}'
        last = member.name
        name, error = _name_or_error(display, member.name, season)
        if not keep(name):
          continue
        data = None if error else tar.extractfile(member).read()
        if data is not None and len(data) != member.size:
          raise EOFError(f'member {member.name} has {len(data)} of {member.size} bytes')
        yield Task(display=display, name=name, data=data, error=error)
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise layout.Sen12msError(
        f'Archive {archive!r} is truncated or corrupt after {last!r} ({type(e).__name__}: '
        f'{e}); download it again (compare its size/MD5 with mediaTUM) or unpack the '
        'good copy into the manual dir.') from e


def read_task(task, band_indexes):
  """Decodes and validates one patch (runs in worker processes).

  Args:
    task: a Task.
    band_indexes: rasterio 1-based band indexes to read, in output order.

  Returns:
    (example, None) with example = dict(image=(256, 256, len(band_indexes)) uint16 HWC,
    scene_id, patch_id, file_name, crs, transform=(6,) float64), or (None, message)
    for a bad patch; message names the file and what is wrong.
  """
  if task.error:
    return None, task.error
  try:
    if task.data is not None:
      with rasterio.io.MemoryFile(task.data) as memfile, memfile.open() as src:
        return _decode(src, task, band_indexes), None
    with rasterio.open(task.path) as src:
      return _decode(src, task, band_indexes), None
  except layout.Sen12msError as e:
    return None, str(e)
  except (rasterio.errors.RasterioError, OSError, ValueError, RuntimeError) as e:
    return None, (f'{task.display!r}: not a readable GeoTIFF, truncated or another format '
                  f'({type(e).__name__}: {e}); re-download or re-extract this file.')


def _decode(src, task, band_indexes):
  expected = (len(layout.BAND_NAMES), layout.PATCH_SIZE, layout.PATCH_SIZE,
              np.dtype(layout.PATCH_DTYPE).name)
  if src.driver != 'GTiff':
    raise layout.Sen12msError(
        f'{task.display!r}: is a {src.driver} file, not a GeoTIFF; replace it with the '
        'SEN12MS original.')
  dtypes = set(src.dtypes)
  found = (src.count, src.height, src.width, ','.join(sorted(dtypes)))
  if found != expected:
    raise layout.Sen12msError(
        f'{task.display!r}: has {src.count} bands of {src.height}x{src.width} px, dtype '
        f'{found[3]}; a SEN12MS s2 patch has {expected[0]} bands of {expected[1]}x'
        f'{expected[2]} px, dtype {expected[3]}. Replace it with the original file.')
  if src.crs is None or src.transform.is_identity:
    raise layout.Sen12msError(
        f'{task.display!r}: has no CRS or geotransform; replace it with the original file.')
  image = src.read(list(band_indexes))  # (bands, H, W): rasterio is band-first.
  return dict(
      image=np.ascontiguousarray(np.transpose(image, (1, 2, 0))),
      scene_id=np.int32(task.name.scene_id),
      patch_id=np.int32(task.name.patch_id),
      file_name=task.name.file_name,
      # 'EPSG:326xx' where the CRS has an EPSG code, else WKT; both round-trip
      # through rasterio.crs.CRS.from_string.
      crs=src.crs.to_string(),
      transform=np.asarray(tuple(src.transform)[:6], np.float64),
  )


@contextlib.contextmanager
def worker_pool(num_workers):
  """A process pool of num_workers (None when num_workers <= 1: read in this process).

  'spawn', not fork: the caller may hold threads (JAX, TFDS) that a fork copies broken.
  One pool serves every split of a build, so workers start once.
  """
  if num_workers <= 1:
    yield None
    return
  with multiprocessing.get_context('spawn').Pool(num_workers) as pool:
    yield pool


def ordered_map(fn, items, pool):
  """Yields fn(item) for each item in order, computed in `pool` (None: in this process).

  At most `_IN_FLIGHT_PER_WORKER` items per worker are in flight, so a streamed archive
  is never buffered whole.
  """
  if pool is None:
    yield from map(fn, items)
    return
  window = pool._processes * _IN_FLIGHT_PER_WORKER  # pylint: disable=protected-access
  pending = collections.deque()
  for item in items:
    pending.append(pool.apply_async(fn, (item,)))
    if len(pending) >= window:
      yield pending.popleft().get()
  while pending:
    yield pending.popleft().get()


def default_num_workers():
  """The CPUs this process may use."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
