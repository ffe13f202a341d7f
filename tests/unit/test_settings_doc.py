"""README's settings table is generated from the model: it fails here when they differ."""
from tools import settings_doc


def test_readme_settings_table_is_the_models():
    text = settings_doc.README.read_text()
    assert settings_doc.current(text) == settings_doc.block(), (
        "README.md's settings table differs from aggregator/config.py: run `python -m tools.settings_doc --write`")


def test_table_has_a_row_per_setting():
    rows = settings_doc.table().splitlines()[2:]
    assert len(rows) == len(settings_doc.config.FIELDS)
    assert any(r.startswith("| `AGG_INGEST_TOKEN` (or `AGG_INGEST_TOKEN_FILE`) | `--ingest-token` | empty |")
               for r in rows)
