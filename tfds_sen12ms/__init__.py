"""SEN12MS for TFDS without TensorFlow; importing this package registers `sen12ms`."""

from tfds_sen12ms.layout import Sen12msError
from tfds_sen12ms.sen12ms import Sen12ms
from tfds_sen12ms.sen12ms import Sen12msConfig

__all__ = ['Sen12ms', 'Sen12msConfig', 'Sen12msError']
