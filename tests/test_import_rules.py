"""The import rules of docs/architecture.md ("What may import what"), held on the code: every
`import opd_*` / `from opd_* import` statement (top level or inside a function) is read with `ast`."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
T = "opd_services.teacher"
VLLM_DIALECT = ("vllm", "vllm_core", "vllm_chat", "vllm_tokenize", "vllm_logprobs", "vllm_text")

# (modules: a package prefix or a module, may not import: prefixes), as the page states them.
RULES = [
    ("opd_client", ("opd_services",)),
    (f"{T}.engines", (f"{T}.service", f"{T}.batcher", f"{T}.server", f"{T}.surfaces", "opd_services.tenancy")),
    (f"{T}.text", (f"{T}.engines", f"{T}.service", f"{T}.batcher", f"{T}.surfaces")),
    (f"{T}.service", (f"{T}.surfaces",)),
    (f"{T}.batcher", (f"{T}.surfaces", f"{T}.service", f"{T}.text", f"{T}.server")),
    (f"{T}.surfaces.http", (f"{T}.engines", f"{T}.batcher", f"{T}.surfaces.dialects")),
    (f"{T}.surfaces.grpc", (f"{T}.engines", f"{T}.batcher", f"{T}.surfaces.dialects")),
    (f"{T}.surfaces.protocol", (f"{T}.engines", f"{T}.batcher", f"{T}.surfaces.dialects")),
    (f"{T}.surfaces.common", (f"{T}.engines", f"{T}.batcher", f"{T}.surfaces.dialects")),
    (f"{T}.surfaces.dialects", (f"{T}.surfaces.http", f"{T}.surfaces.grpc", f"{T}.surfaces.protocol",
                                f"{T}.engines")),
    (f"{T}.surfaces.dialects.sglang", tuple(f"{T}.surfaces.dialects.{m}" for m in VLLM_DIALECT)),
    *((f"{T}.surfaces.dialects.{m}", (f"{T}.surfaces.dialects.sglang",)) for m in VLLM_DIALECT),
    ("opd_services.scorer", (T,)),
    ("opd_services.trainer", (T,)),
    ("opd_services.tenancy", (T,)),
    ("opd_services.stack", (T,)),
    ("opd_services.demo", (T,)),
    ("opd_services.modeling", ("opd_services.teacher", "opd_services.scorer", "opd_services.trainer",
                               "opd_services.tenancy", "opd_services.tasks")),
    ("opd_services.tasks", (T, "opd_services.scorer", "opd_client.queue")),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT / ("client" if path.is_relative_to(ROOT / "client") else "services"))
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every opd_* module `path` imports, absolute (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.update(f"{base}.{a.name}" for a in node.names)   # `from pkg import mod` imports pkg.mod
            out.add(base)
    return {m for m in out if m.startswith("opd_")}


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(rules=RULES) -> list[str]:
    files = [p for d in ("client/opd_client", "services/opd_services") for p in (ROOT / d).rglob("*.py")
             if "_proto" not in p.parts]
    out = []
    for path in files:
        mod = module_name(path)
        for scope, banned in rules:
            if not under(mod, scope):
                continue
            for imp in sorted(imports(path)):
                if any(under(imp, b) and not under(imp, scope) for b in banned):
                    out.append(f"{path.relative_to(ROOT)} ({mod}) imports {imp}: {scope} may not import {banned}")
    return out


def test_the_documented_import_rules_hold():
    assert violations() == []


def test_a_broken_rule_is_reported():
    """The check can fail: the batcher does import engines.base, so banning engines flags it."""
    found = violations([(f"{T}.batcher", (f"{T}.engines",))])
    assert found and all("batcher.py" in v and "engines" in v for v in found)


@pytest.mark.parametrize("scope", [s for s, _ in RULES])
def test_every_rule_names_code_that_exists(scope):
    parts = scope.split(".")
    base = ROOT / ("client" if parts[0] == "opd_client" else "services") / Path(*parts)
    assert base.is_dir() or base.with_suffix(".py").is_file(), scope
