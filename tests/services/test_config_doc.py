"""docs/configuration.md's settings table is Settings, rendered; no OPD_* variable is read
outside Settings unless READ_ELSEWHERE lists it; OPD_LOG_LEVEL is validated like the rest."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from opd_services import config_doc
from opd_services.cli import main as opd_main
from opd_services.config import DEMO, EXPERIMENTS, FLEET, READ_ELSEWHERE, SCORER, SERVE, TRAIN, Settings
from opd_services.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PROCESSES = {SERVE, SCORER, TRAIN, DEMO, EXPERIMENTS, FLEET}
OPD_NAME = re.compile(r"OPD_[A-Z0-9_]+")


def test_the_page_table_is_settings_rendered():
    page = config_doc.PAGE.read_text()
    assert config_doc.rendered(page) == page, \
        "docs/configuration.md's settings table is stale: run .venv/bin/python -m opd_services.config_doc --write"


def test_every_field_has_a_row_and_names_known_processes():
    table = config_doc.table()
    for name, f in Settings.model_fields.items():
        assert f"| `OPD_{name.upper()}` |" in table
        assert f.description, f"Settings.{name} has no description"
        assert set(config_doc.read_by(name, f)) <= PROCESSES, name


def test_a_changed_description_makes_the_page_stale(monkeypatch):
    page = config_doc.PAGE.read_text()
    monkeypatch.setattr(Settings.model_fields["max_top_k"], "description", "Largest top_k, reworded.")
    assert config_doc.rendered(page) != page


def test_a_field_without_read_by_is_refused(monkeypatch):
    monkeypatch.setattr(Settings.model_fields["acl_sync_s"], "json_schema_extra", None)
    with pytest.raises(ValueError, match=r"Settings\.acl_sync_s does not say which processes read it"):
        config_doc.table()


def test_check_and_write_on_a_stale_copy(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "configuration.md"
    page = config_doc.PAGE.read_text()
    stale.write_text(page.replace("| `OPD_MAX_TOP_K` | `20` |", "| `OPD_MAX_TOP_K` | `32` |"))
    monkeypatch.setattr(config_doc, "PAGE", stale)
    assert config_doc.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert config_doc.main(["--write"]) == 0
    assert stale.read_text() == page and config_doc.main(["--check"]) == 0


def test_defaults_are_written_as_a_user_types_them(monkeypatch):
    monkeypatch.setenv("OPD_MAX_TOP_K", "99")             # declared defaults, not this environment's
    rows = {line.split(" | ")[0].strip("| `"): line.split(" | ")[1] for line in config_doc.table().splitlines()[2:]}
    assert rows["OPD_MAX_TOP_K"] == "`20`"
    assert rows["OPD_MAX_BATCH_TOKENS"] == "`16384`"
    assert rows["OPD_BATCHING"] == "`true`" and rows["OPD_VLLM_PREFIX_CACHE"] == "`false`"
    assert rows["OPD_CACHE_DIR"] == "`~/.cache/opd`"
    assert rows["OPD_PREFIX_CACHE_MB"] == "unset" and rows["OPD_MODEL"] == "unset"
    assert rows["OPD_BATCH_WAIT_MS"] == "`5`" and rows["OPD_REPLICA_CHECK_RATE"] == "`0.001`"


def test_cache_dir_default_is_expanded_when_read():
    assert Settings.load().cache_dir == Path("~/.cache/opd").expanduser()
    assert Settings.load(cache_dir="~/x").cache_dir == Path("~/x").expanduser()


# --- no OPD_* variable is read by hand -------------------------------------------------------

def opd_names_in(source: str) -> set[str]:
    """OPD_* names a module spells out: string constants (environ keys, getenv arguments, env
    dicts) and keyword names (env.update(OPD_X=...))."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and OPD_NAME.fullmatch(node.value):
            names.add(node.value)
        elif isinstance(node, ast.keyword) and node.arg and OPD_NAME.fullmatch(node.arg):
            names.add(node.arg)
    return names


def test_the_scan_sees_a_hand_read_variable():
    src = 'import os\nx = os.environ.get("OPD_NEW_THING", "1")\ny = os.getenv("OPD_OTHER")\nenv.update(OPD_KW="1")\n'
    assert opd_names_in(src) == {"OPD_NEW_THING", "OPD_OTHER", "OPD_KW"}
    assert opd_names_in('raise ConfigError(f"OPD_MODEL={v!r}: bad")') == set()   # messages are not reads


def test_every_opd_variable_in_the_code_is_a_setting_or_listed():
    known = {f"OPD_{n.upper()}" for n in Settings.model_fields} | set(READ_ELSEWHERE)
    unknown = {}
    for root in ("services", "client"):
        for path in (REPO / root).rglob("*.py"):
            for name in opd_names_in(path.read_text()) - known:
                unknown.setdefault(name, []).append(str(path.relative_to(REPO)))
    assert not unknown, ("OPD_* variables read outside Settings: add a Settings field (and read it "
                         f"through Settings), or list them in config.READ_ELSEWHERE: {unknown}")
    assert not set(READ_ELSEWHERE) & {f"OPD_{n.upper()}" for n in Settings.model_fields}


# --- OPD_LOG_LEVEL ---------------------------------------------------------------------------

def test_log_level_any_case(monkeypatch):
    monkeypatch.setenv("OPD_LOG_LEVEL", "WARNING")
    assert Settings.load().log_level == "warning"
    assert Settings.load(log_level="Debug").log_level == "debug"


def test_bad_log_level_names_the_variable(monkeypatch):
    monkeypatch.setenv("OPD_LOG_LEVEL", "loud")
    with pytest.raises(ConfigError, match=r"OPD_LOG_LEVEL='loud': .*must be a log level: one of debug, info"):
        Settings.load()


def test_opd_train_refuses_a_bad_log_level(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("OPD_LOG_LEVEL", "loud")
    assert opd_main(["train", "--out", str(tmp_path), "--direct"]) == 2
    assert "OPD_LOG_LEVEL='loud'" in capsys.readouterr().err
