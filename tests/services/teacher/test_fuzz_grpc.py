"""Protobuf fuzzing of every method of opd.teacher.v1.Teacher on a real teacher (tiny torch
model, real Valkey registry, auth on): random messages built from the descriptors (every field,
extreme and out-of-range values, NaN and infinities, huge repeated fields), byte-level mutations
of valid messages, another method's message, and random bytes; half sent with a key.

Held to: no INTERNAL or UNKNOWN status and no hang, every OK answer parses as the method's
response type and holds one result per input, and the teacher scores the same numbers
afterwards. Methods are read from the descriptor, so a new one is fuzzed without touching this
file. Bounded: CASES per method, a fixed seed (a failure reproduces).
"""
from __future__ import annotations

import math
import random
import time

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as F

from opd_client import TeacherClient
from opd_client._proto.opd.teacher.v1 import teacher_pb2 as pb

from fuzz_helpers import FIXED, fuzz_target

CASES = {"Score": 600, "Generate": 120, "GetModel": 60}
SERVICE = pb.DESCRIPTOR.services_by_name["Teacher"]
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
INTS = (0, 1, -1, 2, 3, 2**31 - 1, -2**31, 127, 128, 255, 256, 10**6)
FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, math.nan, math.inf, -math.inf)


@pytest.fixture(scope="module")
def target(settings):
    with fuzz_target(settings) as t:
        yield t


def _int(rng: random.Random, unsigned: bool, bits: int) -> int:
    r = rng.random()
    v = rng.randrange(0, 128) if r < 0.6 else rng.randrange(0, 5) if r < 0.8 else rng.choice(INTS)
    lo, hi = (0, 2**bits - 1) if unsigned else (-2**(bits - 1), 2**(bits - 1) - 1)
    return min(max(v, lo), hi)


def _scalar(f, rng: random.Random):
    t = f.type
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return _int(rng, False, 32)
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return _int(rng, False, 64)
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return _int(rng, True, 32)
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return _int(rng, True, 64) if rng.random() < 0.9 else 2**64 - 1
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return rng.uniform(-3, 3) if rng.random() < 0.5 else rng.choice(FLOATS)
    if t == F.TYPE_BOOL:
        return rng.random() < 0.5
    if t == F.TYPE_STRING:
        return "".join(chr(rng.choice((rng.randrange(32, 127), rng.randrange(0x80, 0x10FFFF) & ~0x800)))
                       for _ in range(rng.choice((0, 1, 8, 300))))
    if t == F.TYPE_BYTES:
        return rng.randbytes(rng.choice((0, 4, 64)))
    if t == F.TYPE_ENUM:
        return rng.choice(f.enum_type.values).number
    raise AssertionError(f"unhandled field type {t} of {f.full_name}")


def random_message(cls, rng: random.Random, depth: int = 0):
    """Every field of `cls` (and nested messages) set at random, or left unset."""
    msg = cls()
    for f in cls.DESCRIPTOR.fields:
        if rng.random() < 0.2:
            continue
        nested = f.type == F.TYPE_MESSAGE
        if nested and f.message_type.GetOptions().map_entry:     # a map<K, V> of scalars
            key, value = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            for _ in range(rng.choice((0, 1, 3))):
                getattr(msg, f.name)[_scalar(key, rng)] = _scalar(value, rng)
        elif f.is_repeated:
            huge = rng.random() < 0.02 and not nested
            n = 300_000 if huge else rng.choice((0, 1, 2, 3, 5, 8, 40) if not nested else (0, 1, 2, 4, 16))
            if depth > 2:
                n = min(n, 2)
            if nested:
                for _ in range(n):
                    getattr(msg, f.name).add().CopyFrom(random_message(f.message_type._concrete_class, rng, depth + 1))
            elif huge:                          # one value repeated: cheap to build, as big on the wire
                getattr(msg, f.name).extend([_scalar(f, rng)] * n)
            else:
                getattr(msg, f.name).extend(_scalar(f, rng) for _ in range(n))
        elif nested:
            getattr(msg, f.name).CopyFrom(random_message(f.message_type._concrete_class, rng, depth + 1))
        else:
            setattr(msg, f.name, _scalar(f, rng))
    return msg


def _mutate(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw or b"\x00")
    for _ in range(rng.randrange(1, 6)):
        op, i = rng.random(), rng.randrange(len(b))
        if op < 0.4:
            b[i] ^= 1 << rng.randrange(8)
        elif op < 0.6:
            del b[i:]
            b = b or bytearray(b"\x08")
        elif op < 0.8:
            b[i:i] = rng.randbytes(rng.randrange(1, 8))
        else:
            b[i] = rng.choice((0x00, 0x7F, 0x80, 0xFF))
    return bytes(b)


def payloads(method, rng: random.Random):
    """Yield (kind, bytes) for one method: random messages, mutations, another type, random bytes."""
    req = pb.DESCRIPTOR.message_types_by_name[method.input_type.name]._concrete_class
    others = [m._concrete_class for m in pb.DESCRIPTOR.message_types_by_name.values() if m is not method.input_type]
    while True:
        r = rng.random()
        if r < 0.55:
            yield "random", random_message(req, rng).SerializeToString()
        elif r < 0.8:
            yield "mutated", _mutate(random_message(req, rng).SerializeToString(), rng)
        elif r < 0.9:
            yield "wrong-type", random_message(rng.choice(others), rng).SerializeToString()
        else:
            yield "bytes", rng.randbytes(rng.choice((1, 7, 100, 5000)))


def _check_ok(method, raw_req: bytes, raw_resp: bytes) -> str | None:
    resp_cls = pb.DESCRIPTOR.message_types_by_name[method.output_type.name]._concrete_class
    try:
        resp = resp_cls.FromString(raw_resp)
    except Exception as e:  # noqa: BLE001 - reported as a schema violation
        return f"OK answer does not parse as {resp_cls.__name__}: {e}"
    if method.name in ("Score", "Generate"):
        req = pb.DESCRIPTOR.message_types_by_name[method.input_type.name]._concrete_class.FromString(raw_req)
        n_in = len(req.sequences if method.name == "Score" else req.prompts)
        if len(resp.results) != n_in or not resp.model.revision:
            return f"OK answer holds {len(resp.results)} results for {n_in} inputs"
    return None


def test_every_grpc_method_survives_fuzzing(target):
    host = target.teacher.grpc_url.split("://")[1]
    with TeacherClient(target.teacher.grpc_url, api_key=target.api_key) as c:
        before = c.score(FIXED, top_k=3)
    rng = random.Random(20261202)
    seen, failures, t0 = {}, [], time.monotonic()
    key = (("authorization", f"Bearer {target.api_key}"),)
    with grpc.insecure_channel(host, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        for method in SERVICE.methods:
            call = ch.unary_unary(f"/{SERVICE.full_name}/{method.name}")
            gen = payloads(method, rng)
            for i in range(CASES.get(method.name, 50)):
                kind, raw = next(gen)
                try:
                    out = call(raw, timeout=60, metadata=key if i % 2 == 0 else ())
                    code, problem = grpc.StatusCode.OK, _check_ok(method, raw, out)
                except grpc.RpcError as e:
                    code, problem = e.code(), (f"{e.code().name}: {e.details()}" if e.code() in BAD else None)
                seen[code.name] = seen.get(code.name, 0) + 1
                if problem:
                    failures.append(f"{method.name} [{kind}, {len(raw)} bytes]: {problem}")
    n = sum(seen.values())
    print(f"\ngRPC fuzz: {n} calls over {len(SERVICE.methods)} methods in {time.monotonic() - t0:.1f}s; "
          f"INTERNAL/UNKNOWN: {seen.get('INTERNAL', 0) + seen.get('UNKNOWN', 0)}; codes: {seen}")
    assert not failures, "\n".join(failures[:20])
    assert seen.get("OK", 0) > 10 and seen.get("INVALID_ARGUMENT", 0) > 10 and seen.get("UNAUTHENTICATED", 0) > 10
    with TeacherClient(target.teacher.grpc_url, api_key=target.api_key) as c:
        after = c.score(FIXED, top_k=3)
    for a, b in zip(before.results, after.results):
        assert (a.logprobs_T == b.logprobs_T).all() and (a.top_ids_T_K == b.top_ids_T_K).all()
