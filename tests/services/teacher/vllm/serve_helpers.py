"""What the tests that hold us to a real `vllm serve` share: starting one on a free loopback port
(bench/vllm_peer.py's VllmServe, the same wrapper bench/peer.py uses) and comparing two answers key
for key, type for type, numbers within 1e-3."""
from __future__ import annotations

import contextlib
import importlib.util
import socket
from pathlib import Path


def _load_vllm_peer():
    """bench/vllm_peer.py, by path, once. bench/ is a folder of scripts, not a package: putting it on
    sys.path would make every script there (`peer`, `text`, `scoring`, ...) a top-level module name
    for the whole test session, so only this one file is loaded, under a name of its own."""
    path = Path(__file__).parents[4] / "bench" / "vllm_peer.py"
    spec = importlib.util.spec_from_file_location("bench_vllm_peer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VllmServe = _load_vllm_peer().VllmServe


@contextlib.contextmanager
def vllm_serve(model: Path, log_dir: Path, **kwargs):
    """A real `vllm serve` of `model` on a free loopback port, for the duration of the block."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with VllmServe(model, port, served_name=model.name, log_path=log_dir / "serve.log", **kwargs) as srv:
        yield srv


def same_shape(ours, theirs, volatile: set, path: str = "$", rank_ties: int = 0) -> None:
    """Same keys in the same order, nesting, types and strings; floats within 1e-3. Keys in `volatile`
    differ by nature (ids, clocks) or by design; an integer `rank` may be up to `rank_ties` higher in
    vLLM's answer (it counts ties with the actual token, we count strictly greater logprobs)."""
    assert type(ours) is type(theirs) or {type(ours), type(theirs)} <= {int, float}, \
        f"{path}: {type(ours).__name__} vs vLLM's {type(theirs).__name__}"
    if isinstance(theirs, dict):
        assert list(ours) == list(theirs), f"{path}: keys {list(ours)} vs vLLM's {list(theirs)}"
        for k in theirs:
            if k == "rank" and isinstance(theirs[k], int) and rank_ties:
                assert ours[k] <= theirs[k] <= ours[k] + rank_ties, f"{path}.rank: {ours[k]} vs vLLM's {theirs[k]}"
            elif k not in volatile:
                same_shape(ours[k], theirs[k], volatile, f"{path}.{k}", rank_ties)
    elif isinstance(theirs, list):
        assert len(ours) == len(theirs), f"{path}: length {len(ours)} vs vLLM's {len(theirs)}"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            same_shape(a, b, volatile, f"{path}[{i}]", rank_ties)
    elif isinstance(theirs, float):
        assert abs(ours - theirs) <= 1e-3, f"{path}: {ours} vs vLLM's {theirs}"
    else:
        assert ours == theirs, f"{path}: {ours!r} vs vLLM's {theirs!r}"
