"""The vLLM dialect's text side: text prompts become ids and answers' tokens become text, as vLLM 0.32
does with its tokenizer, always through text/ (the model folder's tokenizer).

  - `decode_answer`: what a response needs from the tokenizer for one answer: decoded tokens of the
    prompt and sample logprob positions (vLLM's LogprobsProcessor), the sample's text (vLLM's
    incremental detokenizer, primed with the prompt, the stop token left out, special tokens
    skipped unless asked otherwise) and the prompt's own text and first token (echo).
These functions block (they tokenize); callers run them with `text.tokenizer.run`.

This module does not call the service or render a response shape.
"""
from __future__ import annotations

from dataclasses import dataclass

from opd_services.teacher.surfaces.dialects.vllm_core import Answer
from opd_services.teacher.surfaces.dialects.vllm_logprobs import Entry, positions
from opd_services.teacher.text.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class Decoded:
    """One answer's tokens as text; rows are None where nothing was scored."""
    prompt_rows: list[list[Entry]] | None   # positions 1.. of the prompt
    sample_rows: list[list[Entry]] | None   # the sampled tokens
    sample_text: str
    prompt_text: str                        # the prompt as text (echo)
    first_text: str                         # the prompt's first token alone (echo's unscored entry)


def _rows(tok: Tokenizer | None, actual: list[int], sc, k: int) -> list[list[Entry]]:
    tops = sc.top_ids_T_K.tolist() if k and sc.top_ids_T_K is not None else None
    texts = None if tok is None else tok.logprob_texts(actual, tops)
    return positions(actual, sc, k, texts)


def sample_text(tok: Tokenizer, prompt: list[int], sample, skip_special_tokens: bool) -> str:
    """vLLM's output text: the sampled ids detokenized incrementally after the prompt, the token that
    stopped the sample (EOS or a stop id) not detokenized."""
    ids = sample.token_ids_T.tolist()
    if sample.finish_reason == "stop":
        ids = ids[:-1]
    return "".join(tok.incremental_texts(ids, prompt, skip_special_tokens=skip_special_tokens))


def decode_answer(tok: Tokenizer | None, a: Answer, prompt_k: int | None, sample_k: int | None, *,
                  skip_special_tokens: bool = True, prompt_text: str | None = None) -> Decoded:
    """Everything a response renders from the tokenizer for one answer (tok None: ids only)."""
    prompt_rows = None if a.scores is None else _rows(tok, a.prompt[1:], a.scores, prompt_k or 0)
    sample_rows = None
    if a.sample_scores is not None:
        sample_rows = _rows(tok, a.sample.token_ids_T.tolist(), a.sample_scores, sample_k or 0)
    if tok is None:
        return Decoded(prompt_rows, sample_rows, "", "", "")
    text = "" if a.sample is None else sample_text(tok, a.prompt, a.sample, skip_special_tokens)
    echo = prompt_text if prompt_text is not None else tok.decode(a.prompt)
    return Decoded(prompt_rows, sample_rows, text, echo, tok.decode(a.prompt[:1]))
