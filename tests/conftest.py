"""Fixtures shared by the test modules."""

import jax
import pytest


@pytest.fixture
def x64():
  """Float64 JAX for one test only (the context manager restores the flag)."""
  with jax.enable_x64(True):
    yield
