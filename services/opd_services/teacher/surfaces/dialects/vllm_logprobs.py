"""vLLM 0.32's logprob shapes, one renderer each, with decoded tokens where the teacher has a tokenizer.

A scored position is a list of `Entry` (id, logprob, rank, text), as vLLM's LogprobsProcessor
builds it: the actual (prompt or sampled) token first with its true rank, then the top-k not
already in it (rank j). `text` is vLLM's `decoded_token` (Tokenizer.logprob_texts), None without a
tokenizer. Shapes:
  - `prompt_logprobs`: [null, {"<id>": {"logprob", "rank", "decoded_token"}}, ...];
  - `completion_logprobs`: OpenAI's legacy {"text_offset", "token_logprobs", "tokens", "top_logprobs"},
    tokens named by their text (or "token_id:N" with return_tokens_as_token_ids), the first k + 1
    entries of each position in top_logprobs keyed by text (equal texts collapse, as in vLLM);
    `completion_logprobs_ids` is the tokenizer-less form ("token_id:N", offsets 0);
  - `chat_logprobs`: {"content": [{"token", "logprob", "bytes", "top_logprobs": [first k entries]}]};
  - `tokens_logprobs`: GenerateLogProbs of /inference/v1/generate.
Logprobs of -inf render as -9999.0 in the OpenAI shapes, as vLLM clamps them.

This module does not call the service and does not tokenize or decode: texts come in.
"""
from __future__ import annotations

from typing import Any, NamedTuple


class Entry(NamedTuple):
    id: int
    logprob: float
    rank: int | None
    text: str | None


def positions(actual_T: list[int], sc, k: int, texts: list[list[str]] | None = None) -> list[list[Entry]]:
    """Per scored position, its entries: the actual token first, then the top-k (first occurrence of an id)."""
    n = len(actual_T)
    lps = sc.logprobs_T.tolist()
    ranks = sc.rank_T.tolist() if sc.rank_T is not None else [None] * n
    top_ids = sc.top_ids_T_K.tolist() if k and sc.top_ids_T_K is not None else [[]] * n
    top_lps = sc.top_logprobs_T_K.tolist() if k and sc.top_ids_T_K is not None else [[]] * n
    out = []
    for t, tok in enumerate(actual_T):
        names = texts[t] if texts is not None else None
        row = {tok: Entry(tok, lps[t], ranks[t], names[0] if names else None)}
        for j, (tid, tlp) in enumerate(zip(top_ids[t], top_lps[t]), 1):
            row.setdefault(tid, Entry(tid, tlp, j, names[j] if names else None))
        out.append(list(row.values()))
    return out


def _clamped(lp: float) -> float:
    return max(lp, -9999.0)


def prompt_logprobs(rows: list[list[Entry]] | None, k: int | None) -> list | None:
    """vLLM's prompt_logprobs: [null, {"<id>": {"logprob", "rank", "decoded_token"}, ...}, ...]."""
    if k is None:
        return None
    out: list[Any] = [None]
    for row in rows or ():
        out.append({str(e.id): {"logprob": e.logprob, "rank": e.rank, "decoded_token": e.text} for e in row})
    return out


def completion_logprobs(token_ids: list[int], rows: list[list[Entry] | None], k: int, first_text: str,
                        as_ids: bool = False) -> dict:
    """OpenAI's legacy logprobs as vLLM fills them; rows[i] None = the unscored first token (echo)."""
    offsets, lps, tokens, tops = [], [], [], []
    last = 0
    for i, (tid, row) in enumerate(zip(token_ids, rows)):
        if row is None:
            name = f"token_id:{tid}" if as_ids else first_text
            lps.append(None)
            tops.append(None)
        else:
            name = f"token_id:{tid}" if as_ids else row[0].text
            lps.append(_clamped(row[0].logprob))
            top: dict[str, float] = {}
            for j, e in enumerate(row):
                if j <= k:
                    top[f"token_id:{e.id}" if as_ids else e.text] = _clamped(e.logprob)
            tops.append(top)
        offsets.append(0 if i == 0 else offsets[-1] + last)
        last = len(name)
        tokens.append(name)
    return {"text_offset": offsets, "token_logprobs": lps, "tokens": tokens, "top_logprobs": tops}


def completion_logprobs_ids(sample, sc) -> dict:
    """vLLM's CompletionLogProbs for the sampled tokens, tokens named "token_id:N" (no tokenizer)."""
    ids = sample.token_ids_T.tolist()
    tops = ([{f"token_id:{i}": lp for i, lp in zip(ti, tl)} for ti, tl in
             zip(sc.top_ids_T_K.tolist(), sc.top_logprobs_T_K.tolist())] if sc.top_ids_T_K is not None
            else [None] * len(ids))
    return {"text_offset": [0] * len(ids), "token_logprobs": sc.logprobs_T.tolist(),
            "tokens": [f"token_id:{i}" for i in ids], "top_logprobs": tops}


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(rows: list[list[Entry]], k: int, as_ids: bool = False) -> dict:
    """vLLM's ChatCompletionLogProbs: per sampled token its text, logprob, UTF-8 bytes and the first k
    entries of its position (the sampled token first, as vLLM lists them)."""
    content = []
    for row in rows:
        a = row[0]
        tops = []
        for e in row[:k]:
            name = f"token_id:{e.id}" if as_ids else e.text
            tops.append({"token": name, "logprob": _clamped(e.logprob), "bytes": _utf8(name)})
        content.append({"token": f"token_id:{a.id}" if as_ids else a.text, "logprob": _clamped(a.logprob),
                        "bytes": _utf8(a.text), "top_logprobs": tops})
    return {"content": content}


def tokens_logprobs(sample, sc, k: int) -> dict:
    """vLLM's GenerateLogProbs: per sampled token {token_id, logprob, rank, top_logprobs}, where top_logprobs
    holds the first max(k, 1) entries of [sampled token, then the top-k not already in it], as vLLM orders them."""
    content = []
    for row in positions(sample.token_ids_T.tolist(), sc, k):
        a = row[0]
        entries = [{"token_id": e.id, "logprob": e.logprob, "rank": e.rank} for e in row]
        content.append({"token_id": a.id, "logprob": a.logprob, "rank": a.rank,
                        "top_logprobs": entries[:max(k, 1)]})
    return {"content": content}
