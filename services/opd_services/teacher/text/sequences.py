"""A scoring sequence given as text or chat messages -> token ids, score_from and offsets.

  - `text` + `score_from_char` b: the whole text is tokenized once (special tokens added as the
    tokenizer does, e.g. Llama's BOS); tokens ending at or before b are context, the rest is
    scored. A token that straddles b is refused: the boundary must fall between tokens.
  - `messages`: rendered with the model's chat template (chat.py); scoring starts at the first
    scored message's first token (assistant messages are scored, any message may say
    `"score": true|false`) and runs to the end; each message's token span is returned so a
    trainer can mask the turns it does not train on.
`encode_prompts` and `check_length` are the same checks for the dialects' text prompts.
The answer (`TextView`) carries the ids that were scored, each token's character offsets in the
text (for messages, in the rendered text) and the spans. This module does not score.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from opd_client.types import is_int
from opd_services.errors import InvalidRequest
from opd_services.teacher.text.chat import render
from opd_services.teacher.text.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class TextView:
    """How a text or chat sequence became ids: what a trainer needs to map numbers back."""

    token_ids_L: np.ndarray                    # int64 [L]
    offsets_L_2: np.ndarray                    # int64 [L, 2]: characters [start, end) in `text`
    score_from: int
    text: str                                  # the text tokenized (for messages: the rendered chat)
    message_spans_M_2: np.ndarray | None = None  # int64 [M, 2]: each message's tokens [start, end); -1 = not rendered verbatim

    @property
    def offsets_T_2(self) -> np.ndarray:
        return self.offsets_L_2[self.score_from:]


def check_length(n: int, field: str, max_len: int, what: str = "") -> None:
    """A text's tokens against the model's max length, the count in the message."""
    if n > max_len:
        raise InvalidRequest(field, f"{what}is {n} tokens long; the model's max length is {max_len} tokens: "
                                    f"shorten it by {n - max_len} tokens")


def _check_scorable(n: int, field: str, max_len: int) -> None:
    check_length(n, field, max_len)
    if n < 2:
        raise InvalidRequest(field, f"gives {n} token(s); scoring needs at least 2")


def encode_prompts(tok: Tokenizer, texts: list[str], fields: list[str], *, add_special_tokens: bool,
                   max_len: int) -> list[list[int]]:
    """Each prompt text's token ids (the dialects' `tokenizer(text, add_special_tokens=...)`), each
    non-empty and within the model's max length."""
    out = []
    for text, field in zip(texts, fields):
        ids = tok.encode(text, field, add_special_tokens=add_special_tokens).ids_L.tolist()
        if not ids:
            raise InvalidRequest(field, "tokenizes to no tokens; send a non-empty text")
        check_length(len(ids), field, max_len)
        out.append(ids)
    return out


def from_text(tok: Tokenizer, text: str, score_from_char: int | None, field: str, *, max_len: int,
              add_special_tokens: bool = True) -> TextView:
    enc = tok.encode(text, f"{field}.text", add_special_tokens=add_special_tokens)
    n = int(enc.ids_L.shape[0])
    _check_scorable(n, f"{field}.text", max_len)
    if score_from_char is None:
        return TextView(enc.ids_L, enc.offsets_L_2, 1, text)
    b = score_from_char
    bf = f"{field}.score_from_char"
    if not is_int(b) or not 0 <= b <= len(text):
        raise InvalidRequest(bf, f"must be a character index in [0, {len(text)}] of the text, got {b!r}")
    starts, ends = enc.offsets_L_2[:, 0], enc.offsets_L_2[:, 1]
    inside = np.flatnonzero((starts < b) & (ends > b))
    if inside.size:
        i = int(inside[0])
        s, e = int(starts[i]), int(ends[i])
        raise InvalidRequest(bf, f"{b} falls inside token {i} ({text[s:e]!r}, characters [{s}, {e})): the boundary "
                                 f"must fall between tokens; use {s} or {e}")
    s = int((ends <= b).sum())
    if not 1 <= s < n:
        raise InvalidRequest(bf, f"{b} leaves {'no token before it' if s < 1 else 'no token after it'} "
                                 f"({n} tokens); scoring needs context before the boundary and a token after it")
    return TextView(enc.ids_L, enc.offsets_L_2, s, text)


def from_messages(tok: Tokenizer, messages, field: str, *, max_len: int, chat_template_kwargs: dict | None = None,
                  tools: list | None = None) -> TextView:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(f"{field}.messages", "must be a non-empty list of messages ({\"role\", \"content\"})")
    scored = [_scored(m, f"{field}.messages[{i}]") for i, m in enumerate(messages)]
    chat = render(tok, messages, f"{field}.messages", chat_template_kwargs=chat_template_kwargs, tools=tools)
    n = int(chat.encoded.ids_L.shape[0])
    _check_scorable(n, f"{field}.messages", max_len)
    first = next((i for i, s in enumerate(scored) if s), None)
    if first is None:
        raise InvalidRequest(f"{field}.messages", "no message is scored: assistant messages are, and any message "
                                                  "may say \"score\": true")
    start = int(chat.spans_M_2[first, 0])
    if start < 0:
        raise InvalidRequest(f"{field}.messages[{first}].content",
                             "the chat template does not render this message's content verbatim, so where its tokens "
                             "start is unknown: send the rendered text with score_from_char instead")
    if not 1 <= start < n:
        raise InvalidRequest(f"{field}.messages[{first}]", "the first scored message needs a token before it")
    return TextView(chat.encoded.ids_L, chat.encoded.offsets_L_2, start, chat.text, chat.spans_M_2)


def _scored(m, field: str) -> bool:
    if not isinstance(m, dict):
        raise InvalidRequest(field, "must be an object with role and content")
    flag = m.get("score")
    if flag is not None and not isinstance(flag, bool):
        raise InvalidRequest(f"{field}.score", f"must be true or false, got {flag!r}")
    return m.get("role") == "assistant" if flag is None else flag
