"""Rewriting a study's section of a Markdown file (docs/results.md) between its two marker comments."""

from __future__ import annotations

from pathlib import Path

from ex2l_xai.fileio import atomic_write


def rewrite_section(md: Path, markers: tuple[str, str], text: str) -> None:
    """Replace what lies between ``markers`` in ``md`` with ``text`` (the markers are appended where missing; the
    rest of the file is kept as it is); written atomically."""
    begin, end = markers
    doc = md.read_text() if md.exists() else f"{begin}\n{end}\n"
    if begin not in doc or end not in doc:
        doc += f"\n{begin}\n{end}\n"
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    atomic_write(md, f"{head}{begin}\n{text}{end}{tail}")
