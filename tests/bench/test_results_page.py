"""bench/check_results.py against the real results page, and against small pages that break each of
its rules (it must fail on them, naming the line). Runs the script as `make test` users would."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"
CHECK = BENCH / "check_results.py"

GOOD = """# Results

Intro: no command or date needed here.

## R: scoring service

Measured 2026-11-29 19:00 UTC. Command: `.venv/bin/python bench/scoring.py`

### Notes

Text.

## Q: queue

Measured 2026-11-29.

```
.venv/bin/python bench/queue_bench.py --only q2
```
"""


def check(page: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), str(page)], capture_output=True, text=True, timeout=60)


def test_the_results_page_passes():
    run = check(BENCH / "RESULTS.md")
    assert run.returncode == 0, run.stderr


def test_a_page_with_every_field_passes(tmp_path):
    (tmp_path / "page.md").write_text(GOOD)
    run = check(tmp_path / "page.md")
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("broken, expected", [
    (GOOD + "\n## R: scoring service\n\n`.venv/bin/python bench/scoring.py` 2026-12-01\n",
     "line 21: heading 'R: scoring service' repeats the heading on line 5"),
    (GOOD.replace("### Notes", "### Q: QUEUE"), "heading 'Q: queue' repeats the heading on line 9"),
    (GOOD.replace("Command: `.venv/bin/python bench/scoring.py`", "Command: scoring.py"),
     "line 5: section 'R: scoring service' has no command"),
    (GOOD.replace("Measured 2026-11-29.", "Measured in November."),
     "line 13: section 'Q: queue' has no date"),
    (GOOD.replace("bench/queue_bench.py", "bench/queue.py"), "names bench/queue.py, which does not exist"),
])
def test_a_broken_page_fails_naming_the_line(tmp_path, broken, expected):
    (tmp_path / "page.md").write_text(broken)
    run = check(tmp_path / "page.md")
    assert run.returncode == 1
    assert expected in run.stderr, run.stderr
