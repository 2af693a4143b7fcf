"""Session fixtures for engine tests (helpers in engine_fixtures.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_fixtures import make_adapters, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapters(tiny_model_dir, tmp_path_factory.mktemp("tiny_adapters"))
