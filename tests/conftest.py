"""Shared test settings: headless plotting, hypothesis without deadlines (CI machines are slow), stand-ins."""

import os
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("MPLBACKEND", "Agg")

settings.register_profile("rsseg", deadline=None, print_blob=True)
settings.load_profile("rsseg")


@pytest.fixture
def stand_ins(monkeypatch):
    """``model.arch`` of the tiny test network, importable in the child processes a test starts too."""
    from stand_ins import TINY_ARCH

    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p))
    return TINY_ARCH
@pytest.fixture(autouse=True)
def _entry_point_settings_stay_out_of_pytest(monkeypatch):
    """``rsseg.cli.main`` configures the process it runs in (allocator, threads, exported variables); tests that
    call it in pytest's own process leave pytest as it is. Fresh processes (test_side_effects.py,
    test_process.py, Dask workers) still apply the settings."""
    from rsseg.pipeline import process

    monkeypatch.setattr(process, "configure_process", lambda *args, **kwargs: None)


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests selected (``-m gpu``) on a machine without CUDA are skipped, not failed."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="needs a CUDA device")
            for item in gpu:
                item.add_marker(skip)
