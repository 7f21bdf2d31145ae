"""ScoringService: the one core behind every surface (HTTP, gRPC, the vLLM dialect).

It validates a request against the scoring contract (DESIGN.md), hands the sequences to the
batcher, and returns results with the model's identity. Surfaces only parse their wire
format into `ScoreRequest` and map `ScoreResult` / errors back. This module does no I/O
and knows no wire format.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from opd_client.types import ModelInfo, is_int
from opd_services import metrics
from opd_services.config import Settings
from opd_services.errors import ConfigError, InvalidRequest, NotFound, ResourceExhausted, Unavailable
from opd_services.teacher.batcher import Batcher
from opd_services.teacher.engines.base import Engine, GenerateItem, ItemScores, Sampled, SampleParams, ScoreItem
from opd_services.teacher.text.sequences import from_messages, from_text
from opd_services.teacher.text.tokenizer import Tokenizer
from opd_services.teacher.text.tokenizer import require as require_tokenizer
from opd_services.teacher.text.tokenizer import run as run_text
from opd_services.tenancy.auth import DEFAULT, Authenticator, Tenant, UsageRecorder

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SequenceIn:
    """One of token_ids, text or messages (text/: the model's tokenizer turns the others into ids)."""
    token_ids: Any = None           # list[int] or an int array, length L
    score_from: int | None = None   # with token_ids; None = 1
    id: str = ""
    candidate_ids: Any = None       # [L - s][C] ids, list of lists or a 2-D int array
    text: str | None = None
    score_from_char: int | None = None   # with text: the character where scoring starts
    messages: Any = None            # chat messages, rendered with the model's chat template


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    sequences: list[SequenceIn]
    top_k: int = 0
    temperature: float = 1.0
    entropy: bool = False
    rank: bool = False              # the actual token's rank per position (the vLLM dialect needs it)
    teacher: str = ""               # the teacher meant; "" = this one, another name -> NotFound
    chat_template_kwargs: dict | None = None   # messages: extra template variables (e.g. enable_thinking)
    add_special_tokens: bool = True            # text: let the tokenizer add its special tokens (BOS)


@dataclass(frozen=True, slots=True)
class PromptIn:
    token_ids: Any                  # list[int] or an int array, length >= 1
    id: str = ""


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    prompts: list[PromptIn]
    max_tokens: int = 16
    temperature: float = 1.0        # 0 = greedy
    stop_ids: Any = ()
    seed: int | None = None
    teacher: str = ""               # the teacher meant; "" = this one, another name -> NotFound


@dataclass(frozen=True, slots=True)
class GenerateResult:
    model: ModelInfo
    ids: list[str]
    samples: list[Sampled]
    prompt_tokens: int
    generated_tokens: int


@dataclass(frozen=True, slots=True)
class ScoreResult:
    model: ModelInfo
    ids: list[str]
    scores: list[ItemScores]
    top_k: int
    scored_tokens: int
    total_tokens: int
    views: list                     # per sequence: TextView (text / messages) or None


class ScoringService:
    def __init__(self, settings: Settings, engine_factory: Callable[[], Engine],
                 authenticator: Authenticator | None = None, usage: UsageRecorder | None = None,
                 tokenizer_factory: Callable[[], Tokenizer | None] | None = None):
        self.settings = settings
        self._engine_factory = engine_factory
        self._tokenizer_factory = tokenizer_factory or (lambda: None)
        self.tokenizer: Tokenizer | None = None    # the model folder's (text/); None = ids only
        self.authenticator = authenticator or Authenticator("off" if settings.auth == "off" else "auto", None)
        self.usage = usage
        self._tenant_tokens: dict[str, int] = {}
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.draining = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the engine off the event loop (health answers meanwhile), then start batching."""
        self.engine = await asyncio.to_thread(self._engine_factory)
        self.tokenizer = await asyncio.to_thread(self._tokenizer_factory)
        s, tok = self.settings, self.tokenizer
        if tok is not None and tok.info.vocab_size > self.engine.info.vocab_size:
            raise ConfigError(f"the tokenizer has {tok.info.vocab_size} tokens but the model only "
                              f"{self.engine.info.vocab_size} embedding rows: they do not belong together")
        self.engine.info = dataclasses.replace(self.engine.info, teacher=s.teacher_name,
                                               tokenizer=None if tok is None else tok.info)
        on_time = None
        if self.usage is not None:
            loop, usage = asyncio.get_running_loop(), self.usage
            on_time = lambda exp, sec: loop.call_soon_threadsafe(lambda: usage.add(exp, teacher_ms=sec * 1000))  # noqa: E731
        self.batcher = Batcher(self.engine, max_batch_tokens=s.max_batch_tokens,
                               batch_wait_ms=s.batch_wait_ms, batching=s.batching, on_engine_time=on_time)
        self.batcher.start()
        metrics.ENGINE_INFO.info({k: str(v) for k, v in self.engine.info.to_dict().items() if k != "tokenizer"})
        metrics.READY.set(1)
        log.info("teacher ready: %s", self.engine.info)

    @property
    def ready(self) -> bool:
        return self.batcher is not None and not self.draining

    async def drained(self, timeout: float) -> bool:
        """Refuse new work; wait (up to `timeout`) until no request is in flight."""
        self.draining = True
        metrics.READY.set(0)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            log.warning("drain timeout (%.1fs) with %d request(s) in flight", timeout, self._inflight)
            return False

    async def shutdown(self, timeout: float) -> None:
        """Refuse new work, let in-flight requests finish (up to `timeout`), stop the engine."""
        await self.drained(timeout)
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.stop, 5.0)
        if self.engine is not None:
            self.engine.close()

    def model_info(self) -> ModelInfo:
        if self.engine is None:
            raise Unavailable("the teacher engine is still loading; retry when GET /readyz answers 200")
        return self.engine.info

    # ---- scoring ------------------------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> Tenant:
        try:
            return await self.authenticator.authenticate(authorization)
        except Exception:
            metrics.REJECTIONS.labels("unknown", "auth").inc()
            raise

    def _check_ready(self) -> None:
        if not self.ready:
            raise Unavailable("the teacher is draining" if self.draining else
                              "the teacher engine is still loading; retry when GET /readyz answers 200")

    def _validated(self, validate, req, tenant: Tenant):
        try:
            return validate(req)
        except InvalidRequest:
            self._rejected(tenant, "invalid")
            raise

    @contextlib.contextmanager
    def _in_flight(self, tenant: Tenant, tokens: int):
        """Admit within the experiment's quota; count the request until it is answered (drain)."""
        self._admit(tenant, tokens)
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            self._tenant_tokens[tenant.name] -= tokens
            if self._inflight == 0:
                self._idle.set()

    def _check_teacher(self, teacher: str) -> None:
        """A request naming another teacher (score or generate) is NotFound; "" means any."""
        if teacher and teacher != self.settings.teacher_name:
            raise NotFound(f"teacher {teacher!r} is not served here: this is teacher "
                           f"{self.settings.teacher_name!r}; point the client at {teacher!r}'s replicas "
                           "(OPD_TEACHERS on a scorer)")

    async def score(self, req: ScoreRequest, tenant: Tenant = DEFAULT) -> ScoreResult:
        self._check_ready()
        self._check_teacher(req.teacher)
        req, views = await self._as_ids(req, tenant)
        items = self._validated(self.validate, req, tenant)
        tokens = sum(it.n_tokens for it in items)
        with self._in_flight(tenant, tokens):
            scores = await self.batcher.submit(items, tenant.name, tenant.weight)
        scored = sum(it.n_scored for it in items)
        metrics.SCORED_TOKENS.labels(tenant.name).inc(scored)
        if self.usage is not None:
            self.usage.add(tenant.name, requests=1, scored_tokens=scored)
        return ScoreResult(model=self.engine.info, ids=[s.id for s in req.sequences], scores=scores,
                           top_k=req.top_k, scored_tokens=scored, total_tokens=tokens, views=views)

    async def _as_ids(self, req: ScoreRequest, tenant: Tenant) -> tuple[ScoreRequest, list]:
        """Text and chat sequences tokenized (text/, off the event loop); id sequences as they are."""
        if all(seq.text is None and seq.messages is None for seq in req.sequences or ()):
            return req, [None] * len(req.sequences or ())
        try:
            views = await run_text(self._views, req)
        except InvalidRequest:
            self._rejected(tenant, "invalid")
            raise
        seqs = [seq if v is None else dataclasses.replace(seq, token_ids=v.token_ids_L, score_from=v.score_from,
                                                          text=None, messages=None, score_from_char=None)
                for seq, v in zip(req.sequences, views)]
        return dataclasses.replace(req, sequences=seqs), views

    def _views(self, req: ScoreRequest) -> list:
        _check_count("sequences", req.sequences, self.settings.max_request_sequences, "sequence")
        max_len, views = self.model_info().max_model_len, []
        for i, seq in enumerate(req.sequences):
            field = f"sequences[{i}]"
            given = [k for k in ("token_ids", "text", "messages") if getattr(seq, k) is not None]
            if not given:
                raise InvalidRequest(f"{field}.token_ids", "is required (or send the sequence as text or messages)")
            if len(given) != 1:
                raise InvalidRequest(field, "needs exactly one of token_ids, text or messages, got "
                                            f"{' and '.join(given) or 'none'}")
            if seq.text is not None or seq.messages is not None:
                if seq.score_from is not None:
                    raise InvalidRequest(f"{field}.score_from", "goes with token_ids; with text use score_from_char "
                                                                "(with messages, the scored turns say where)")
            if seq.score_from_char is not None and seq.text is None:
                raise InvalidRequest(f"{field}.score_from_char", "goes with text only")
            if seq.text is not None:
                tok = require_tokenizer(self.tokenizer, f"{field}.text")
                views.append(from_text(tok, seq.text, seq.score_from_char, field, max_len=max_len,
                                       add_special_tokens=req.add_special_tokens))
            elif seq.messages is not None:
                tok = require_tokenizer(self.tokenizer, f"{field}.messages")
                views.append(from_messages(tok, seq.messages, field, max_len=max_len,
                                           chat_template_kwargs=req.chat_template_kwargs))
            else:
                views.append(None)
        return views

    def _admit(self, tenant: Tenant, tokens: int) -> None:
        """The experiment's in-flight token quota: over it -> 429, never a queue that grows."""
        held = self._tenant_tokens.get(tenant.name, 0)
        quota = tenant.max_inflight_tokens
        if quota is not None and held + tokens > quota:
            self._rejected(tenant, "quota")
            if tokens > quota:
                raise InvalidRequest("sequences", f"{tokens} tokens in one request exceeds experiment "
                                                  f"{tenant.name!r}'s in-flight quota of {quota}; split it")
            raise ResourceExhausted(f"experiment {tenant.name!r} has {held} tokens in flight; its quota is "
                                    f"{quota}: retry after the Retry-After delay", retry_after=1.0)
        self._tenant_tokens[tenant.name] = held + tokens

    def _rejected(self, tenant: Tenant, reason: str) -> None:
        metrics.REJECTIONS.labels(tenant.name, reason).inc()
        if self.usage is not None:
            self.usage.add(tenant.name, rejections=1)

    async def generate(self, req: GenerateRequest, tenant: Tenant = DEFAULT) -> GenerateResult:
        """Sample completions from the teacher (for SFT baselines and mixed on/off-policy data)."""
        self._check_ready()
        self._check_teacher(req.teacher)
        item = self._validated(self.validate_generate, req, tenant)
        if not hasattr(self.engine, "generate"):
            raise InvalidRequest("prompts", f"the {self.engine.info.engine} engine cannot generate; use the torch engine")
        with self._in_flight(tenant, item.n_tokens):
            samples = await self.batcher.call(lambda engine: engine.generate(item), item.n_tokens, tenant.name)
        generated = sum(int(x.token_ids_T.shape[0]) for x in samples)
        metrics.GENERATED_TOKENS.labels(tenant.name).inc(generated)
        if self.usage is not None:
            self.usage.add(tenant.name, requests=1)
        return GenerateResult(model=self.engine.info, ids=[p.id for p in req.prompts], samples=samples,
                              prompt_tokens=sum(int(p.shape[0]) for p in item.prompts), generated_tokens=generated)

    def validate_generate(self, req: GenerateRequest) -> GenerateItem:
        """The same checks as scoring, for prompts and sampling parameters."""
        info, s = self.model_info(), self.settings
        mt = req.max_tokens
        if not is_int(mt) or not 1 <= mt <= s.max_generate_tokens:
            raise InvalidRequest("max_tokens", f"must be an integer in [1, {s.max_generate_tokens}], got {mt!r}")
        t = req.temperature
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            raise InvalidRequest("temperature", f"must be a finite number >= 0 (0 = greedy), got {t!r}")
        stops = _int_array("stop_ids", list(req.stop_ids) if req.stop_ids is not None else [], 1)
        check_vocab("stop_ids", stops, info.vocab_size)
        if req.seed is not None and (not is_int(req.seed) or not 0 <= req.seed < 2**63):
            raise InvalidRequest("seed", f"must be an integer in [0, 2^63), got {req.seed!r}")
        _check_count("prompts", req.prompts, s.max_request_sequences, "prompt")
        prompts, total = [], 0
        for i, p in enumerate(req.prompts):
            field = f"prompts[{i}].token_ids"
            ids = _int_array(field, p.token_ids, 1)
            if ids.shape[0] < 1:
                raise InvalidRequest(field, "needs at least 1 token")
            if ids.shape[0] + mt > info.max_model_len:
                raise InvalidRequest(field, f"{ids.shape[0]} tokens + max_tokens {mt} exceeds the model's max length "
                                            f"{info.max_model_len}")
            check_vocab(field, ids, info.vocab_size)
            total += ids.shape[0] + mt
            if total > s.max_request_tokens:
                raise InvalidRequest("prompts", f"more than {s.max_request_tokens} tokens (prompts + max_tokens) in one "
                                                "request; split it")
            prompts.append(ids)
        params = SampleParams(max_tokens=int(mt), temperature=float(t), stop_ids=tuple(int(x) for x in stops),
                              seed=None if req.seed is None else int(req.seed))
        return GenerateItem(prompts=prompts, params=params)

    def validate(self, req: ScoreRequest) -> list[ScoreItem]:
        """Check every field against the contract; raise InvalidRequest naming the first bad one."""
        info, s = self.model_info(), self.settings
        if not is_int(req.top_k) or not 0 <= req.top_k <= s.max_top_k:
            raise InvalidRequest("top_k", f"must be an integer in [0, {s.max_top_k}] (the server's max), got {req.top_k!r}")
        t = req.temperature
        if not _is_number(t) or not math.isfinite(t) or t <= 0:
            raise InvalidRequest("temperature", f"must be a finite number > 0, got {t!r}")
        _check_count("sequences", req.sequences, s.max_request_sequences, "sequence")
        items, total = [], 0
        check = getattr(self.engine, "check", None)   # optional engine hook (engine.py)
        for i, seq in enumerate(req.sequences):
            item = _validate_sequence(f"sequences[{i}]", seq, info, s.max_candidates, req)
            if check is not None:
                check(item, f"sequences[{i}]")
            total += item.n_tokens
            if total > s.max_request_tokens:
                raise InvalidRequest("sequences", f"more than {s.max_request_tokens} tokens in one request; split it")
            items.append(item)
        return items


def _check_count(field: str, entries: list, most: int, noun: str) -> None:
    if not entries:
        raise InvalidRequest(field, f"must hold at least one {noun}")
    if len(entries) > most:
        raise InvalidRequest(field, f"{len(entries)} {noun}s; at most {most} per request")


def _int_array(field: str, value: Any, ndim: int) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        raise InvalidRequest(field, "must be a rectangular array of integers") from None
    if arr.dtype == object or (arr.size and arr.dtype.kind not in "iu"):
        raise InvalidRequest(field, "must hold integers only")
    if arr.ndim != ndim:
        raise InvalidRequest(field, f"must be {ndim}-dimensional, got shape {list(arr.shape)}")
    return arr.astype(np.int64, copy=False)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def check_vocab(field: str, ids: Any, vocab: int) -> None:
    """The one vocabulary check, of every surface: InvalidRequest naming the first id outside [0, vocab)
    as `field[i]` (`field[i][j]` for rows). `ids` is an int array or a (rectangular) list of ints."""
    if isinstance(ids, np.ndarray):
        arr = ids
    else:
        try:
            arr = np.asarray(ids, dtype=np.int64)
        except OverflowError:    # an id past int64 (JSON allows it): compare as Python ints
            arr = np.asarray(ids, dtype=object)
    bad = np.flatnonzero((arr < 0) | (arr >= vocab))
    if bad.size:
        idx = np.unravel_index(bad[0], arr.shape)
        where = "".join(f"[{int(j)}]" for j in idx)
        raise InvalidRequest(f"{field}{where}", f"token id {int(arr[idx])} is outside the vocabulary [0, {vocab})")


def _validate_sequence(field: str, seq: SequenceIn, info: ModelInfo, max_cands: int, req: ScoreRequest) -> ScoreItem:
    if seq.token_ids is None:
        raise InvalidRequest(f"{field}.token_ids", "is required (or send the sequence as text or messages)")
    if seq.score_from_char is not None:
        raise InvalidRequest(f"{field}.score_from_char", "goes with text only")
    ids = _int_array(f"{field}.token_ids", seq.token_ids, 1)
    n = ids.shape[0]
    if n < 2:
        raise InvalidRequest(f"{field}.token_ids", f"needs at least 2 tokens, got {n}")
    if n > info.max_model_len:
        raise InvalidRequest(f"{field}.token_ids", f"{n} tokens exceeds the model's max length {info.max_model_len}")
    check_vocab(f"{field}.token_ids", ids, info.vocab_size)
    s = 1 if seq.score_from is None else seq.score_from
    if not is_int(s) or not 1 <= s < n:
        raise InvalidRequest(f"{field}.score_from", f"must be an integer in [1, {n - 1}] for {n} tokens, got {s!r}")
    cands = None
    if seq.candidate_ids is not None:
        cands = _int_array(f"{field}.candidate_ids", seq.candidate_ids, 2)
        rows, width = cands.shape
        if rows != n - s:
            raise InvalidRequest(f"{field}.candidate_ids", f"needs one row per scored position ({n - s}), got {rows}")
        if not 1 <= width <= max_cands:
            raise InvalidRequest(f"{field}.candidate_ids", f"each row needs 1..{max_cands} ids, got {width}")
        check_vocab(f"{field}.candidate_ids", cands, info.vocab_size)
    return ScoreItem(token_ids=ids, score_from=int(s), top_k=req.top_k, temperature=float(req.temperature),
                     entropy=bool(req.entropy), candidate_ids_T_C=cands, rank=bool(req.rank))
