"""A tokenizer's identity, computed the same way by the teacher and by a trainer.

The teacher reports, in its model identity (`GET /v1/model`, gRPC `GetModel`), a sha256 of its
tokenizer's files and of its chat template. A trainer computes the same two hashes of its
student's tokenizer folder with `tokenizer_fingerprint(folder)` and refuses a teacher whose
tokenizer is not its student's. Plain files only: no transformers, no network.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

# The files a Hugging Face tokenizer is made of (any that the folder holds).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")


def has_tokenizer(folder: str | Path) -> bool:
    root = Path(folder)
    return any((root / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt"))


def files_sha256(folder: str | Path) -> str:
    """sha256 over the tokenizer files present (name and bytes, in TOKENIZER_FILES order)."""
    root, h = Path(folder), hashlib.sha256()
    for name in TOKENIZER_FILES:
        p = root / name
        if p.is_file():
            h.update(name.encode() + b"\0")
            h.update(p.read_bytes())
    return "sha256:" + h.hexdigest()


def chat_template(folder: str | Path) -> str | None:
    """The folder's default chat template, as transformers resolves it: chat_template.jinja, then
    chat_template.json, then tokenizer_config.json's `chat_template` (a string, or named templates
    of which "default")."""
    root = Path(folder)
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        p = root / name
        if p.is_file():
            value = json.loads(p.read_text()).get("chat_template")
            if isinstance(value, list):
                value = next((t.get("template") for t in value if t.get("name") == "default"), None)
            if isinstance(value, str):
                return value
    return None


def template_sha256(template: str | None) -> str:
    """sha256 of a chat template's text; "" when there is none."""
    return "" if template is None else "sha256:" + hashlib.sha256(template.encode()).hexdigest()


def tokenizer_fingerprint(folder: str | Path) -> dict:
    """{"files_sha256", "chat_template_sha256"} of a tokenizer folder, comparable with the teacher's
    `model.tokenizer` fields."""
    return {"files_sha256": files_sha256(folder), "chat_template_sha256": template_sha256(chat_template(folder))}
