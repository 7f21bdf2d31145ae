"""The committed gRPC stubs are exactly what `make proto` generates from proto/."""
from pathlib import Path

import opd_client._proto.generate as gen


def test_committed_stubs_are_fresh():
    rendered = gen.render()
    assert rendered, "protoc produced nothing"
    for rel, text in rendered.items():
        path = Path(gen.HERE) / rel
        assert path.exists(), f"{rel} missing: run `make proto` and commit"
        assert path.read_text() == text, f"{rel} is stale: run `make proto` and commit"
