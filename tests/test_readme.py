"""The README documents the table schemas; it must say what the code writes."""

from __future__ import annotations

from pathlib import Path

from pipelines.schemas import markdown

START, END = "<!-- schemas:start -->", "<!-- schemas:end -->"


def test_readme_schema_section_matches_schemas(repo_root: Path) -> None:
    text = (repo_root / "README.md").read_text()
    section = text[text.index(START) + len(START) : text.index(END)].strip()
    assert section == markdown().strip(), "README schema section is stale: run `python -m pipelines.schemas --readme`"
