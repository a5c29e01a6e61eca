"""BENCHMARKS.md is written by several commands, each owning its own `## ` sections:
bench/run_bench.py (the layer and kernel tables, the peers, the targets), `fp8moe bench --convert`
(convert throughput, pasted with its command) and bench/model_bench.py (full-size fine-tuning).
These helpers let one command rewrite its sections and keep the others'."""

from __future__ import annotations

import os
import re


def split(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(preamble, [(heading, section text including the heading line)])."""
    parts = re.split(r"(?m)^(?=## )", text)
    pre, sections = parts[0], []
    for p in parts[1:]:
        heading = p.splitlines()[0][3:].strip()
        sections.append((heading, p))
    return pre, sections


def foreign_sections(path: str, own: list[str]) -> str:
    """The sections of the existing file at `path` whose headings start with none of `own`."""
    if not os.path.exists(path):
        return ""
    _pre, sections = split(open(path, encoding="utf-8").read())
    return "".join(s for h, s in sections if not any(h.startswith(o) for o in own))


def replace_section(path: str, heading: str, body: str) -> None:
    """Writes section `## heading` (body includes the heading line) into `path`, replacing the one
    of exactly that heading (variants such as "<heading> - W8A8 ..." are sections of their own) or
    appending it."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    pre, sections = split(text)
    body = body.rstrip("\n") + "\n\n"
    out, done = [pre], False
    for h, s in sections:
        if h == heading.strip():
            out.append(body)
            done = True
        else:
            out.append(s.rstrip("\n") + "\n\n")  # the last section may end without its blank line
    if not done:
        out.append(body)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(out).rstrip("\n") + "\n")
