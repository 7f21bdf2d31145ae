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


def teacher_settings(model: Path, cache_dir: Path, **over) -> Settings:
    """A torch teacher on loopback (free ports) with the tests' limits."""
    given = dict(model=str(model), engine="torch", device="cpu", host="127.0.0.1", http_port=0, grpc_port=0,
                 cache_dir=cache_dir, max_top_k=20, max_request_sequences=64, max_request_tokens=8192,
                 max_body_bytes=1 << 20, drain_timeout_s=5)
    return Settings(**(given | over))


@pytest.fixture(scope="session")
def settings(tiny_model, cache_dir) -> Settings:
    return teacher_settings(tiny_model, cache_dir)


@pytest.fixture(scope="session")
def teacher(settings):
    """One real teacher (HTTP + gRPC on loopback, torch engine, tiny model) for the session."""
    from opd_services.teacher.server import BackgroundTeacher
    with BackgroundTeacher(settings) as t:
        yield t


# ---- real model families: tiny bodies, real tokenizers and chat templates (modeling/tokenizers.py) ----

def _family(cache_dir: Path, family: str) -> Path:
    from opd_services.modeling.checkpoints import cached_family
    from opd_services.modeling.tokenizers import TokenizerMissing
    try:
        return cached_family(cache_dir, family)
    except TokenizerMissing as e:   # `make test` fetches them; a bare pytest run may not have
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def qwen3_model(cache_dir) -> Path:
    """Tiny Qwen3 (hidden 64, head_dim 32) with Qwen3's real tokenizer (151,669 tokens) and chat template."""
    return _family(cache_dir, "qwen3")


@pytest.fixture(scope="session")
def llama3_model(cache_dir) -> Path:
    """Tiny Llama-3 with Llama-3's real tokenizer (128,256 tokens) and chat template."""
    return _family(cache_dir, "llama3")


@pytest.fixture(scope="session")
def gemma3_model(cache_dir) -> Path:
    """Tiny Gemma-3 (text) with Gemma-3's real tokenizer (262,145 tokens) and chat template."""
    return _family(cache_dir, "gemma3")


@pytest.fixture(scope="session")
def text_settings(qwen3_model, cache_dir) -> Settings:
    return teacher_settings(qwen3_model, cache_dir, max_request_tokens=16384, max_body_bytes=4 << 20)


@pytest.fixture(scope="session")
def text_teacher(text_settings):
    """A real teacher (torch engine) on the tiny Qwen3: text, chat messages and the dialects' text fields."""
    from opd_services.teacher.server import BackgroundTeacher
    with BackgroundTeacher(text_settings) as t:
        yield t
