"""The demo's synthetic task: long addition with every carry written out, and its tokenizer.

A problem adds two N-digit numbers. Digits are written least-significant first, the two
operands interleaved, so that the work for digit i sits a fixed distance from its inputs:

    prompt      <bos> a0 b0 a1 b1 ... a(N-1) b(N-1) =
    completion  s0 c0 s1 c1 ... s(N-1) c(N-1) <eos>

where s_i = (a_i + b_i + c_(i-1)) mod 10 and c_i is the carry out. With N = 12 the
completion is 25 tokens (24 + <eos>). Errors compound: one wrong carry makes every later
digit wrong, so exact match punishes a student that is only right "most of the time".
The grader asks for the whole completion, work included: every digit, every carry, <eos>.

Problems are drawn from numpy generators with fixed seeds; the held-out set is disjoint
from the training stream by construction (its own seed and a parity split on the operands'
hash). This module does no training and knows nothing of torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

# ---- tokenizer --------------------------------------------------------------------------

SPECIALS = ("<bos>", "<eos>", "<pad>")
CHARS = "0123456789+=-*/ ()abcdefghijklmnopqrstuvwxyz.,:;?!"
VOCAB_SIZE = 64                      # the rest are reserved "<unused_N>" tokens
BOS, EOS, PAD = 0, 1, 2
TOKENIZER_FILE = "tokenizer_opd_chars.json"   # matches the revision hash's tokenizer* glob


@dataclass(frozen=True)
class CharTokenizer:
    """One token per character; ids 0..2 are <bos>, <eos>, <pad>."""

    tokens: tuple[str, ...]

    @classmethod
    def default(cls) -> "CharTokenizer":
        toks = SPECIALS + tuple(CHARS)
        return cls(toks + tuple(f"<unused_{i}>" for i in range(VOCAB_SIZE - len(toks))))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        index = {t: i for i, t in enumerate(self.tokens)}
        try:
            return [index[ch] for ch in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the demo tokenizer's alphabet {CHARS!r}") from None

    def decode(self, ids) -> str:
        return "".join(self.tokens[int(i)] if 0 <= int(i) < len(self.tokens) else "<?>" for i in ids)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.write_text(json.dumps({"type": "opd-chars", "tokens": list(self.tokens),
                                    "bos": BOS, "eos": EOS, "pad": PAD}, indent=1))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "CharTokenizer":
        return cls(tuple(json.loads((Path(directory) / TOKENIZER_FILE).read_text())["tokens"]))


TOKENIZER = CharTokenizer.default()
DIGIT0 = TOKENIZER.encode("0")[0]
EQUALS = TOKENIZER.encode("=")[0]

# ---- the task ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AdditionTask:
    n_digits: int = 12
    name: ClassVar[str] = "addition"
    metric_name: ClassVar[str] = "exact match"
    eval_temperature: ClassVar[float] = 0.0     # the metric decodes greedily
    stop_ids: ClassVar[tuple[int, ...]] = (EOS,)

    @property
    def prompt_len(self) -> int:
        return 2 + 2 * self.n_digits           # <bos>, pairs, '='

    @property
    def completion_len(self) -> int:
        return 2 * self.n_digits + 1           # (s, c) pairs and <eos>

    def sample_operands(self, rng: np.random.Generator, n: int, split: str = "train") -> np.ndarray:
        """[n, 2, N] digits, least-significant first. Train and eval are disjoint by parity
        of (digit sum of both operands): eval takes odd, train even."""
        out = np.empty((0, 2, self.n_digits), dtype=np.int64)
        want = 1 if split == "eval" else 0
        while out.shape[0] < n:
            d = rng.integers(0, 10, size=(2 * n, 2, self.n_digits))
            d = d[(d.sum(axis=(1, 2)) % 2) == want]
            out = np.concatenate([out, d])
        return out[:n]

    def prompts(self, operands_B_2_N: np.ndarray) -> np.ndarray:
        """[B, prompt_len] token ids."""
        b = operands_B_2_N.shape[0]
        pairs = operands_B_2_N.transpose(0, 2, 1).reshape(b, -1) + DIGIT0
        return np.concatenate([np.full((b, 1), BOS), pairs, np.full((b, 1), EQUALS)], axis=1)

    def completions(self, operands_B_2_N: np.ndarray) -> np.ndarray:
        """[B, completion_len] the correct completions (what a perfect teacher writes)."""
        a, b = operands_B_2_N[:, 0], operands_B_2_N[:, 1]
        carry = np.zeros(a.shape[0], dtype=np.int64)
        cols = []
        for i in range(self.n_digits):
            t = a[:, i] + b[:, i] + carry
            carry = t // 10
            cols += [t % 10 + DIGIT0, carry + DIGIT0]
        cols.append(np.full(a.shape[0], EOS))
        return np.stack(cols, axis=1)

    def grade(self, operands_B_2_N: np.ndarray, completions) -> np.ndarray:
        """Exact match, bool [B]: the whole completion (every digit, every carry, then <eos>) must
        be the correct one. `completions` are token-id rows of any length."""
        want = self.completions(operands_B_2_N)
        ok = np.zeros(operands_B_2_N.shape[0], dtype=bool)
        for i, comp in enumerate(completions):
            comp = np.asarray(comp).reshape(-1)
            ok[i] = comp.shape[0] == want.shape[1] and bool((comp == want[i]).all())
        return ok

    def stated_sum(self, completion) -> int | None:
        """The sum a completion states (digits and final carry), or None if it is malformed."""
        return _read_sum([int(t) for t in completion], self.n_digits)

    def text(self, ids) -> str:
        return TOKENIZER.decode(ids)


def _value(digits_lsd_first) -> int:
    return int("".join(str(int(d)) for d in digits_lsd_first[::-1]))


def _read_sum(comp: list[int], n: int) -> int | None:
    """The sum a completion states, or None if it is malformed (wrong length, non-digits, no <eos>)."""
    if len(comp) < 2 * n + 1 or comp[2 * n] != EOS:
        return None
    digits = [t - DIGIT0 for t in comp[: 2 * n]]
    if any(not 0 <= d <= 9 for d in digits) or any(c > 1 for c in digits[1::2]):
        return None
    s = digits[0::2]
    return _value(s) + digits[-1] * 10 ** n


DEFAULT_TASK = AdditionTask()
