"""The model folder's tokenizer: loading, identity, encoding with character offsets, decoding.

`load_tokenizer(model_dir)` gives a `Tokenizer` (transformers' fast tokenizer, Rust) or None when
the folder holds no tokenizer files; `require(tok, field)` turns None into the 422 that says so.
Offsets are in characters of the Python string (Unicode code points), half-open [start, end);
a byte-level token that holds part of a character carries that character's offsets.
Decoding comes in the shapes the dialects report text in: `incremental_texts` (a sample's text,
as vLLM's incremental detokenizer builds it), `logprob_texts` (vLLM's `decoded_token`s of logprob
entries), `token_texts` (each token alone, SGLang's `return_text_in_logprobs`) and `token_strs`
(vocabulary pieces, vLLM's /tokenize). `run(fn, ...)` runs tokenizer work on a small thread pool,
never on the event loop.

This module does not render chat messages (chat.py) and knows nothing of requests.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from opd_client.tokenizer_id import chat_template, files_sha256, has_tokenizer, template_sha256
from opd_client.types import TokenizerInfo, check_unicode
from opd_services.errors import InvalidRequest

log = logging.getLogger(__name__)

_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="opd-text")


async def run(fn, *args, **kwargs):
    """fn(*args, **kwargs) on the text thread pool (tokenizing a long text must not stall the loop)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_POOL, lambda: fn(*args, **kwargs))


@dataclass(frozen=True, slots=True)
class Encoded:
    ids_L: np.ndarray                 # int64 [L]
    offsets_L_2: np.ndarray           # int64 [L, 2]: characters [start, end) of each token


@dataclass(eq=False)
class Tokenizer:
    hf: object                        # transformers PreTrainedTokenizerBase (fast)
    info: TokenizerInfo
    template: str | None
    special_ids: frozenset = field(default_factory=frozenset)

    # ---- encoding ---------------------------------------------------------------------------

    def encode(self, text: str, field: str, *, add_special_tokens: bool = True) -> Encoded:
        """Token ids and character offsets of `text`; InvalidRequest naming `field` for text that is
        not valid Unicode (lone surrogates)."""
        check_text(text, field)
        enc = self.hf.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens)
        ids = np.asarray(enc.ids, dtype=np.int64)
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        return Encoded(ids, offsets)

    # ---- decoding ---------------------------------------------------------------------------

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_texts(self, ids) -> list[str]:
        """Each token decoded on its own (a byte-level piece of a character decodes to U+FFFD), as
        SGLang's `return_text_in_logprobs` reports it."""
        return self.hf.batch_decode([[int(i)] for i in ids])

    def token_strs(self, ids) -> list[str]:
        """Each token's vocabulary piece (`convert_ids_to_tokens`: "Ġhello", byte-level symbols), as
        vLLM's /tokenize `return_token_strs` reports it."""
        return [p if p is not None else "" for p in self.hf.convert_ids_to_tokens([int(i) for i in ids])]

    def incremental_texts(self, ids, prefix_ids=(), *, skip_special_tokens: bool = False) -> list[str]:
        """Per token, the text it adds to the decoded sequence after `prefix_ids`, exactly as vLLM's
        detokenizer builds a sample's text (tokenizers' DecodeStream primed with the prompt, vLLM's
        FastIncrementalDetokenizer): a token that ends inside a character adds "" and the one that
        completes it the whole character; bytes still incomplete at the end add nothing."""
        from tokenizers.decoders import DecodeStream
        stream = DecodeStream(ids=[int(i) for i in prefix_ids], skip_special_tokens=skip_special_tokens)
        backend = self.hf.backend_tokenizer
        return [stream.step(backend, int(t)) or "" for t in ids]

    def logprob_texts(self, actual_T, alts_T_K=None) -> list[list[str]]:
        """vLLM's `decoded_token` for the entries of a logprobs position: per position t, the texts of
        [actual_T[t], *alts_T_K[t]], each token decoded on its own (vLLM's convert_ids_list_to_tokens)
        and, where that ends in U+FFFD (part of a character), re-decoded after up to 4 preceding
        actual tokens (vLLM's LogprobsProcessor._correct_decoded_token): "" while the character is
        incomplete, the whole character on the token that completes it. The context is the positions
        before t of this same list: for prompt logprobs vLLM's context never holds the prompt's first
        token (its position has no logprobs), for samples never the prompt."""
        actual = [int(t) for t in actual_T]
        rows = [[a] + ([] if alts_T_K is None else [int(x) for x in alts_T_K[t]]) for t, a in enumerate(actual)]
        single = self._single_texts({i for row in rows for i in row})
        out = []
        for t, row in enumerate(rows):
            context = actual[max(0, t - 4):t]
            out.append([self._completed(i, context, single) if single[i].endswith("\ufffd") else single[i]
                        for i in row])
        return out

    def _single_texts(self, ids) -> dict[int, str]:
        """id -> decode([id]), with the leading spaces decode() strips from a SentencePiece piece restored."""
        ids = sorted(ids)
        texts = self.hf.batch_decode([[i] for i in ids])
        marker = self._space_marker
        if marker is None:
            return {i: t or "" for i, t in zip(ids, texts)}
        pieces = self.hf.convert_ids_to_tokens(ids)
        return {i: _restore_spaces(p or "", t or "", marker) for i, p, t in zip(ids, pieces, texts)}

    def _completed(self, token_id: int, context: list[int], single: dict[int, str]) -> str:
        """vLLM's _correct_decoded_token: the text a partial-character token completes, or ""."""
        for n in range(1, min(len(context), 4) + 1):
            ctx = context[-n:]
            full = self.decode(ctx + [token_id])
            if full.endswith("\ufffd"):
                continue
            clean = len(ctx)
            for j in range(len(ctx) - 1, -1, -1):       # context tokens that were themselves partial
                if self._alone(ctx[j], single).endswith("\ufffd"):
                    clean = j
                else:
                    break
            prefix = self.decode(ctx[:clean]) if clean > 0 else ""
            if full.startswith(prefix):
                return full[len(prefix):]
            common = 0
            for a, b in zip(prefix, full):
                if a != b:
                    break
                common += 1
            return full[common:]
        return ""

    def _alone(self, token_id: int, single: dict[int, str]) -> str:
        return single[token_id] if token_id in single else self.decode([token_id])

    @functools.cached_property
    def _space_marker(self) -> str | None:
        """The Metaspace replacement character of a SentencePiece-style pre-tokenizer, or None (vLLM's
        get_leading_space_marker): only those pieces lose a leading space to decode()."""
        pre = json.loads(self.hf.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
        subs = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
        for sub in subs:
            if sub.get("type") == "Metaspace":
                return sub.get("replacement", "\u2581")
        return None


def _restore_spaces(piece: str, text: str, marker: str) -> str:
    markers = len(piece) - len(piece.lstrip(marker))
    missing = markers - (len(text) - len(text.lstrip(" ")))
    return " " * missing + text if missing > 0 else text


def check_text(text, field: str) -> None:
    if not isinstance(text, str):
        raise InvalidRequest(field, f"must be a string, got {type(text).__name__}")
    check_unicode(text, field)


def require(tok: Tokenizer | None, field: str) -> Tokenizer:
    """The tokenizer, or a 422 naming `field` that says this teacher has none."""
    if tok is None:
        raise InvalidRequest(field, "text needs a tokenizer, and this teacher's model folder has none "
                                    "(no tokenizer.json / tokenizer.model): send token ids, or serve a folder "
                                    "with its tokenizer files")
    return tok


def load_tokenizer(model_dir: str | Path, name: str | None = None) -> Tokenizer | None:
    """The folder's tokenizer, or None (logged) when it has none. Fast tokenizers only."""
    root = Path(model_dir)
    if not has_tokenizer(root):
        log.info("no tokenizer in %s: text and chat requests will be refused (422)", root)
        return None
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(root))
    if not getattr(hf, "is_fast", False):
        from opd_services.errors import ConfigError
        raise ConfigError(f"{root}: the tokenizer is not a fast (Rust) tokenizer; add its tokenizer.json")
    template = chat_template(root) or getattr(hf, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    specials = {k: getattr(hf, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk")}
    info = TokenizerInfo(name=name or root.resolve().name, vocab_size=len(hf),
                         special_ids={k: int(v) for k, v in specials.items() if v is not None},
                         files_sha256=files_sha256(root), chat_template_sha256=template_sha256(template))
    special = {i for i, t in hf.added_tokens_decoder.items() if t.special} | set(hf.all_special_ids)
    return Tokenizer(hf=hf, info=info, template=template, special_ids=frozenset(special))
