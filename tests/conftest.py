"""Shared fixtures: tiny real models (built by our code, cached per session) and real
teacher servers on loopback. Fixtures of one package's tests live in that folder's conftest."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from opd_services.config import Settings
from opd_services.modeling.checkpoints import TINY, build_random_llama


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Where tests build their checkpoints; OPD_TEST_CACHE keeps them between runs."""
    keep = os.environ.get("OPD_TEST_CACHE")
    return Path(keep) if keep else tmp_path_factory.mktemp("opd-cache")


@pytest.fixture(scope="session")
def tiny_model(cache_dir) -> Path:
    """A tiny random-initialised Llama (vocab 128, 2 layers, max length 256), float32."""
    return build_random_llama(cache_dir / "tiny-llama", TINY, seed=1234)


@pytest.fixture(scope="session")
def settings(tiny_model, cache_dir) -> Settings:
    return Settings(model=str(tiny_model), engine="torch", device="cpu", host="127.0.0.1", http_port=0,
                    grpc_port=0, cache_dir=cache_dir, max_top_k=20, max_request_sequences=64,
                    max_request_tokens=8192, max_body_bytes=1 << 20, drain_timeout_s=5)


@pytest.fixture(scope="session")
def teacher(settings):
    """One real teacher (HTTP + gRPC on loopback, torch engine, tiny model) for the session."""
    from opd_services.teacher.server import BackgroundTeacher
    with BackgroundTeacher(settings) as t:
        yield t
