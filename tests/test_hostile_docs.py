"""docs/hostile_inputs.md is the hostile-input tables of tests/test_hostile_*.py, rendered: it must stay current."""

from pathlib import Path

from hostile import markdown_table

DOCS = Path(__file__).resolve().parent.parent / "docs" / "hostile_inputs.md"


def test_the_docs_table_is_the_tests_own_table():
    assert DOCS.read_text(encoding="utf-8") == markdown_table(), "regenerate it: python tests/hostile.py > docs/hostile_inputs.md"
