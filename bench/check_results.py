"""Check the form of bench/RESULTS.md, the results page: what a reader relies on to find a figure.

    .venv/bin/python bench/check_results.py [PAGE]     # PAGE defaults to bench/RESULTS.md

Rules:
  1. No heading repeats. Headings are ATX lines (`#` to `######`) outside ``` fences; two with the
     same text, compared case-insensitively, are an error (each figure has one section).
  2. Every figure section holds what reproduces its figures. A figure section is a `## ` heading and
     everything up to the next `## ` (its `###` subsections included); the text above the first
     `## ` is the page's introduction and needs neither. A section needs
       a. a command in backticks (inline, or a line inside a ``` fence) that runs a script under
          bench/: `... python bench/NAME.py ...` or `bash bench/NAME.sh ...`;
       b. a date written YYYY-MM-DD.
  3. Every bench/ script a command names exists (next to this checker).

It does not check the numbers, that a figure meets its target, or the history/ files.
Exit 0 when the page passes; otherwise 1, with one line per problem naming its line and heading.
"""
from __future__ import annotations

import datetime as dt
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"(?:^|\s)(?:\S*python[\d.]*|bash)\s+(?:-\S+\s+)*bench/([\w.-]+\.(?:py|sh))\b")
DATE = re.compile(r"\b(\d{4}-\d{2}-\d{2})\b")


@dataclass
class Section:
    """One `## ` section: its heading, the line it starts on, and the commands and dates in it."""
    title: str
    line: int
    scripts: list[tuple[int, str]] = field(default_factory=list)   # (line, bench/ script name)
    dates: list[str] = field(default_factory=list)


def code_spans(line: str, in_fence: bool) -> list[str]:
    """The code on one line: the whole line inside a fence, else its inline `spans`."""
    return [line] if in_fence else INLINE_CODE.findall(line)


def real_dates(line: str) -> list[str]:
    out = []
    for text in DATE.findall(line):
        try:
            dt.date.fromisoformat(text)
        except ValueError:
            continue
        out.append(text)
    return out


def read(page: str) -> tuple[list[tuple[int, int, str]], list[Section]]:
    """Headings as (line, level, text), and the `## ` sections with what each holds."""
    headings: list[tuple[int, int, str]] = []
    sections: list[Section] = []
    in_fence = False
    for n, line in enumerate(page.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        m = None if in_fence else HEADING.match(line)
        if m:
            level, text = len(m.group(1)), m.group(2)
            headings.append((n, level, text))
            if level == 2:
                sections.append(Section(text, n))
            continue
        if not sections:
            continue                                   # the introduction
        for code in code_spans(line, in_fence):
            sections[-1].scripts += [(n, name) for name in COMMAND.findall(code)]
        sections[-1].dates += real_dates(line)
    return headings, sections


def problems(page: str, bench: Path = BENCH) -> list[str]:
    """Every rule the page breaks, one message each; empty when it passes."""
    headings, sections = read(page)
    out = []
    # 1) no heading repeats
    seen: dict[str, int] = {}
    for n, _, text in headings:
        key = text.casefold()
        if key in seen:
            out.append(f"line {n}: heading {text!r} repeats the heading on line {seen[key]}; "
                       "merge the two sections or give one another name")
        seen.setdefault(key, n)
    # 2) every figure section has a command and a date; 3) the scripts it names exist
    for s in sections:
        if not s.scripts:
            out.append(f"line {s.line}: section {s.title!r} has no command in backticks that runs a "
                       "bench/ script (e.g. `.venv/bin/python bench/scoring.py`)")
        if not s.dates:
            out.append(f"line {s.line}: section {s.title!r} has no date (YYYY-MM-DD) of its measurement")
        for n, name in s.scripts:
            if not (bench / name).is_file():
                out.append(f"line {n}: section {s.title!r} names bench/{name}, which does not exist in {bench}")
    return out


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else BENCH / "RESULTS.md"
    found = problems(path.read_text(encoding="utf-8"))
    for p in found:
        print(f"{path}: {p}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
