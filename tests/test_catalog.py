"""docs/models.md is generated from the family registry: it fails here when the two disagree."""

from pathlib import Path

from jaxtune.models import catalog
from jaxtune.models.hf import FAMILIES

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def test_models_doc_is_generated_from_the_registry():
    assert DOC.read_text() == catalog.render(), f"docs/models.md is stale; regenerate it: {catalog.COMMAND}"


def test_every_architecture_has_a_row_with_its_facts():
    rows = {line.split(" | ")[0].strip("| `"): line for line in catalog.render().splitlines() if line.startswith("| `")}
    assert set(rows) == set(FAMILIES)
    assert "`llama`" in rows["LlamaForCausalLM"] and "`llama`" not in rows["GPT2LMHeadModel"]
    assert "`RobertaForSequenceClassification`" in rows["RobertaModel"] and "| encoder |" in rows["RobertaModel"]
    assert "| causal LM | yes | yes |" in rows["GPT2LMHeadModel"]


def test_help_prints_the_usage_and_writes_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert catalog.main(["--help"]) == 0
    assert catalog.main(["-x"]) == 2
    assert list(tmp_path.iterdir()) == []
    assert catalog.COMMAND in capsys.readouterr().err
