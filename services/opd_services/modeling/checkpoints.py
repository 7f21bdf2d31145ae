"""Build HF-format Llama-style checkpoints with our own code, for tests, benches and defaults.

Models are random-initialised from a seed (so a rebuild gives the same bytes and the same
revision hash) and written atomically into a cache directory. Nothing here downloads.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int

    @property
    def tag(self) -> str:
        return (f"v{self.vocab_size}-h{self.hidden_size}-l{self.num_hidden_layers}-a{self.num_attention_heads}"
                f"-kv{self.num_key_value_heads}-f{self.intermediate_size}-m{self.max_position_embeddings}")


# The embedded default teacher until the demo task's trained teacher replaces it: random
# weights, small enough to load in a second on CPU. Its name says what it is.
DEFAULT_TEACHER = LlamaShape(512, 128, 4, 4, 2, 352, 2048)
# The scoring bench model of issue 2: hidden 256, 4 layers, 32k vocabulary.
BENCH_MODEL = LlamaShape(32_000, 256, 4, 4, 4, 688, 4096)
# Tiny models for tests.
TINY = LlamaShape(128, 32, 2, 4, 2, 64, 256)
# The tiny model of the vLLM tests: vLLM's CPU attention supports head_dim 32, 64, 80, ...,
# not TINY's 8, so this one has hidden 64 over 2 heads (head_dim 32).
TINY_VLLM = LlamaShape(128, 64, 2, 2, 1, 128, 256)


def llama_config(shape: LlamaShape):
    from transformers import LlamaConfig
    return LlamaConfig(**asdict(shape), tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                       pad_token_id=None)


def save_atomically(model, path: Path, extra: Callable[[Path], None] | None = None) -> Path:
    """save_pretrained into a temp dir beside `path` (plus `extra(tmp)` files), then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if extra is not None:
            extra(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process built it first
            if not (path / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_random_llama(path: str | Path, shape: LlamaShape, *, seed: int = 0, dtype: str = "float32") -> Path:
    """Write a random-initialised LlamaForCausalLM to `path` (atomically); return the path."""
    import torch
    from transformers import LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(shape)).to(getattr(torch, dtype)).eval()
    return save_atomically(model, path)


def cached_random_llama(cache_dir: str | Path, shape: LlamaShape, *, seed: int = 0, prefix: str = "random-llama") -> Path:
    return build_random_llama(Path(cache_dir) / "models" / f"{prefix}-{shape.tag}-s{seed}", shape, seed=seed)


def default_teacher(cache_dir: str | Path) -> Path:
    """The embedded default teacher's directory, built on first use."""
    return cached_random_llama(cache_dir, DEFAULT_TEACHER, prefix="opd-default-teacher-random")
