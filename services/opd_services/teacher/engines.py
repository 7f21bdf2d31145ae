"""Pick and build the engine that settings ask for. Engines load lazily (in start-up)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from opd_services.config import Settings
from opd_services.errors import ConfigError
from opd_services.teacher.engine import Engine


def model_dir(settings: Settings) -> Path:
    """OPD_MODEL, checked now (fail at start-up), or the embedded default teacher."""
    if settings.model is None:
        from opd_services.tasks.checkpoints import default_teacher
        return default_teacher(settings.cache_dir)
    path = Path(settings.model).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"OPD_MODEL={settings.model!r}: no config.json there; point it at an HF-format "
                          "model directory (config.json + *.safetensors)")
    return path


def engine_factory(settings: Settings) -> Callable[[], Engine]:
    if settings.engine == "uniform":
        from opd_services.teacher.uniform_engine import UniformEngine
        return lambda: UniformEngine(max_top_k=settings.max_top_k)
    if settings.engine == "vllm":
        raise ConfigError("OPD_ENGINE='vllm': the vLLM engine is not available in this build yet; use torch")
    path = model_dir(settings)

    def build() -> Engine:
        from opd_services.teacher.torch_engine import TorchEngine
        return TorchEngine(path, device=settings.device, dtype=settings.dtype, max_top_k=settings.max_top_k)
    return build
