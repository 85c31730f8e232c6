"""Test-session settings: offline Hugging Face libraries and one torch thread.

One thread because the unit tests are many small tensor operations: with 2 threads on a busy
2-core machine, OpenMP synchronisation makes a 100 x 100 kernel matrix ~100x slower.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import sys  # noqa: E402

import torch  # noqa: E402  (after the environment variables, before any test imports transformers)

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

torch.set_num_threads(1)

import pytest  # noqa: E402

from helpers import write_corpus  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text corpus for the training tests, written once per test module."""
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture
def isolated_data_cache(tmp_path, monkeypatch):
    """Tokenised-data cache in the test's own folder (modules opt in with `usefixtures`)."""
    monkeypatch.setattr("tvae_core.data.DEFAULT_CACHE_DIR", tmp_path / "data-cache")
