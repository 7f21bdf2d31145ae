"""Build HF-format checkpoints with our own code, for tests, benches and defaults.

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


# The scoring bench model (bench/scoring.py): hidden 256, 4 layers, 32k vocabulary.
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





# ---- tiny checkpoints of real model families, with their real tokenizers ---------------------
# The architecture and tokenizer of a family (Qwen3, Llama-3, Gemma-3) at a size that loads in a
# second on CPU: the full vocabulary (so ids, special tokens and the chat template are the real
# ones), a small body. head_dim 32: vLLM's CPU attention refuses 16 and below. Loadable unchanged
# by transformers and by vLLM. Random weights: the logprobs mean nothing, their exactness does.

@dataclass(frozen=True)
class FamilyShape:
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 32
    intermediate_size: int = 128
    max_position_embeddings: int = 4096

    @property
    def tag(self) -> str:
        return (f"h{self.hidden_size}-l{self.num_hidden_layers}-a{self.num_attention_heads}-kv{self.num_key_value_heads}"
                f"-d{self.head_dim}-f{self.intermediate_size}-m{self.max_position_embeddings}")


FAMILIES = ("qwen3", "llama3", "gemma3")
TINY_FAMILY = FamilyShape()
# The embedded default teacher: Qwen3's architecture, tokenizer and chat template, random weights.
DEFAULT_TEACHER = ("qwen3", FamilyShape(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=32, intermediate_size=352,
                                        max_position_embeddings=8192))


def family_config(family: str, shape: FamilyShape, tokenizer_dir: Path):
    """transformers' own config class of the family, its special ids read from the tokenizer."""
    from transformers import AutoTokenizer

    from opd_services.modeling.tokenizers import PINNED
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    common = dict(vocab_size=PINNED[family].vocab_size, hidden_size=shape.hidden_size,
                  num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
                  num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim,
                  intermediate_size=shape.intermediate_size, max_position_embeddings=shape.max_position_embeddings,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  tie_word_embeddings=True)
    if family == "qwen3":
        from transformers import Qwen3Config
        return Qwen3Config(**common, rope_theta=1_000_000.0)
    if family == "llama3":
        from transformers import LlamaConfig
        common["eos_token_id"] = tok.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])   # as Llama-3 Instruct ships it
        return LlamaConfig(**common, rope_theta=500_000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})
    if family == "gemma3":
        from transformers import Gemma3TextConfig
        return Gemma3TextConfig(**common, sliding_window=512, query_pre_attn_scalar=shape.head_dim,
                                rope_theta=1_000_000.0, final_logit_softcapping=None)
    raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def build_family(path: str | Path, family: str, shape: FamilyShape = TINY_FAMILY, *, seed: int = 0) -> Path:
    """Write a random-initialised tiny checkpoint of `family` with its real tokenizer files (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM

    from opd_services.modeling.tokenizers import tokenizer_files
    path = Path(path)
    if (path / "config.json").exists():
        return path
    tok_dir = tokenizer_files(family)
    config = family_config(family, shape, tok_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()

    def tokenizer(tmp: Path) -> None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tok_dir / f, tmp / f)
    return save_atomically(model, path, tokenizer)


def cached_family(cache_dir: str | Path, family: str, shape: FamilyShape = TINY_FAMILY, *, seed: int = 0) -> Path:
    return build_family(Path(cache_dir) / "models" / f"tiny-{family}-{shape.tag}-s{seed}", family, shape, seed=seed)


def default_teacher(cache_dir: str | Path) -> Path:
    """The embedded default teacher's directory (tiny Qwen3, real tokenizer), built on first use."""
    family, shape = DEFAULT_TEACHER
    return build_family(Path(cache_dir) / "models" / f"opd-default-teacher-random-{family}-{shape.tag}", family, shape)
