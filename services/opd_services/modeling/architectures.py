"""Tiny random checkpoints of many decoder architectures, from transformers' own config classes.

`ARCHITECTURES` maps a name to a builder of that architecture's transformers config (one small
shape for all: vocabulary 256, hidden 64, 2 layers, 2 query heads of head_dim 32, which vLLM's
CPU attention accepts); `build_architecture(name, path, seed)` random-initialises the model from
the seed, in float32, and writes it with `save_atomically` (a rebuild gives the same bytes).

The configs set every logit transform an architecture has to an unusual, nonzero value (Granite's
`logits_scaling`, Cohere's `logit_scale`, Gemma's `final_logit_softcapping`, ...), and the weights
are initialised wide enough (`INIT_RANGE`) that the logits reach the transform's nonlinear range:
an engine that skips a transform cannot agree with the model's own `forward()` by accident. Sliding
windows are shorter than the test sequences, so they are exercised too.

`reference_model` and `reference_logprobs` give what every engine must match: a float64
log-softmax of the model's own `forward()` logits (the model loaded in float64 by transformers,
with its eager, reference attention).

This module does not train, download, tokenize or write a tokenizer (the checkpoints are ids-only),
and it does not check that an engine runs an architecture: tests/services/teacher/
test_architectures.py and vllm/test_vllm_architectures.py do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from opd_services.modeling.checkpoints import save_atomically

VOCAB = 256
HIDDEN = 64
LAYERS = 2
HEADS = 2
KV_HEADS = 1
HEAD_DIM = HIDDEN // HEADS      # 32: vLLM's CPU attention refuses 16 and below
FFN = 128
MAX_LEN = 256
WINDOW = 16                     # sliding windows shorter than the test sequences
# std of the random weights: the default (0.02) gives logits of std ~0.2, where tanh soft-capping
# at 5 is the identity to 1e-4; at 0.2 the logits spread over several units
INIT_RANGE = 0.2


def _common(**extra) -> dict:
    """The fields every builder shares; `extra` overrides or adds architecture-specific ones."""
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=MAX_LEN,
                initializer_range=INIT_RANGE, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    base.update(extra)
    return base


def _llama():
    from transformers import LlamaConfig
    return LlamaConfig(**_common(head_dim=HEAD_DIM))


def _qwen2():
    from transformers import Qwen2Config
    return Qwen2Config(**_common())


def _qwen3():
    from transformers import Qwen3Config
    return Qwen3Config(**_common(head_dim=HEAD_DIM, tie_word_embeddings=True))


def _qwen3_moe():
    from transformers import Qwen3MoeConfig
    return Qwen3MoeConfig(**_common(head_dim=HEAD_DIM, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=64, norm_topk_prob=True))


def _qwen2_moe():
    from transformers import Qwen2MoeConfig
    return Qwen2MoeConfig(**_common(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                    shared_expert_intermediate_size=64))


def _mixtral():
    from transformers import MixtralConfig
    return MixtralConfig(**_common(head_dim=HEAD_DIM, num_local_experts=4, num_experts_per_tok=2))


def _mistral():
    from transformers import MistralConfig
    return MistralConfig(**_common(head_dim=HEAD_DIM, sliding_window=WINDOW))


def _gemma():
    from transformers import GemmaConfig
    return GemmaConfig(**_common(head_dim=HEAD_DIM))


def _gemma2():
    from transformers import Gemma2Config
    return Gemma2Config(**_common(head_dim=HEAD_DIM, sliding_window=WINDOW, final_logit_softcapping=5.0,
                                  attn_logit_softcapping=10.0, query_pre_attn_scalar=24))


def _gemma3_text():
    from transformers import Gemma3TextConfig
    return Gemma3TextConfig(**_common(head_dim=HEAD_DIM, sliding_window=WINDOW, final_logit_softcapping=5.0,
                                      query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention"]))


def _phi3():
    from transformers import Phi3Config
    return Phi3Config(**_common())


def _phi():
    from transformers import PhiConfig
    return PhiConfig(**_common(partial_rotary_factor=0.5))


def _granite():
    from transformers import GraniteConfig
    return GraniteConfig(**_common(logits_scaling=4.0, embedding_multiplier=3.0, residual_multiplier=0.5,
                                   attention_multiplier=0.1))


def _granite_moe():
    from transformers import GraniteMoeConfig
    return GraniteMoeConfig(**_common(logits_scaling=3.0, embedding_multiplier=2.0, residual_multiplier=0.7,
                                      attention_multiplier=0.15, num_local_experts=4, num_experts_per_tok=2))


def _cohere():
    from transformers import CohereConfig
    return CohereConfig(**_common(logit_scale=0.25))


def _cohere2():
    from transformers import Cohere2Config
    return Cohere2Config(**_common(head_dim=HEAD_DIM, logit_scale=0.25, sliding_window=WINDOW,
                                   layer_types=["sliding_attention", "full_attention"]))


def _olmo2():
    from transformers import Olmo2Config
    return Olmo2Config(**_common())


def _gpt_neox():
    from transformers import GPTNeoXConfig
    fields = _common(rotary_pct=0.5)
    del fields["num_key_value_heads"]      # no grouped-query attention: a stray field misleads vLLM's KV cache
    return GPTNeoXConfig(**fields)


def _starcoder2():
    from transformers import Starcoder2Config
    return Starcoder2Config(**_common())


def _stablelm():
    from transformers import StableLmConfig
    return StableLmConfig(**_common(partial_rotary_factor=0.5))


ARCHITECTURES: dict[str, Callable] = {
    "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "qwen3_moe": _qwen3_moe, "qwen2_moe": _qwen2_moe,
    "mixtral": _mixtral, "mistral": _mistral, "gemma": _gemma, "gemma2": _gemma2, "gemma3_text": _gemma3_text,
    "phi3": _phi3, "phi": _phi, "granite": _granite, "granite_moe": _granite_moe, "cohere": _cohere,
    "cohere2": _cohere2, "olmo2": _olmo2, "gpt_neox": _gpt_neox, "starcoder2": _starcoder2, "stablelm": _stablelm,
}


def architecture_config(name: str):
    """The transformers config of `name` (a key of ARCHITECTURES)."""
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]()


def build_architecture(name: str, path: str | Path, seed: int = 0) -> Path:
    """Write a random-initialised float32 `name` causal LM to `path` (atomically, once); return the path."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return path
    config = architecture_config(name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return save_atomically(model, path)


def reference_model(path: str | Path):
    """The checkpoint in float64, run by transformers' reference code: eager attention (its SDPA path
    drops features such as Gemma-2's attention soft-capping) and eager experts (the grouped-matmul
    kernel of the MoE layers has no float64)."""
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager",
                                                experts_implementation="eager").eval()


def reference_logprobs(model64, token_ids, score_from: int, temperature: float = 1.0):
    """log_softmax(forward().logits / temperature) in float64 at the positions predicting
    token_ids[score_from:]: a numpy array [T, V]."""
    import torch
    with torch.inference_mode():
        logits_L_V = model64(input_ids=torch.as_tensor(token_ids)[None], use_cache=False).logits[0]
    return torch.log_softmax(logits_L_V[score_from - 1:-1].double() / temperature, dim=-1).numpy()
