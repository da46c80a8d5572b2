"""A model directory of ``config.json`` and weights alone, no tokenizer file: the model has no tokenizer.

transformers' ``AutoTokenizer`` builds such a directory the family's tokenizer of its special tokens alone
(BERT's has 5), which encodes every word as unknown; ``jaxtune.load`` returned it, and training ran on that.
Now the model has none (token ids still run it), and what must encode text names the directory and the fix.
"""

from __future__ import annotations

import json
import re

import pytest
import transformers
from helpers import tiny_hf_model

import jaxtune as jt
from jaxtune.data.testing import tiny_tokenizer
from jaxtune.tuning import PlanError


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny random BERT classifier saved by transformers without a tokenizer."""
    directory = tmp_path_factory.mktemp("bert")
    tiny_hf_model("BertForSequenceClassification", directory)
    return directory


def _no_tokenizer(directory) -> str:
    return rf"^{re.escape(str(directory))}: the model has no tokenizer to encode text .*give model.tokenizer: "


def test_a_weights_only_directory_loads_without_a_tokenizer(bert):
    reference = transformers.AutoTokenizer.from_pretrained(bert)  # what the old jaxtune.load returned
    assert len(reference) == 5 and reference.convert_ids_to_tokens(reference("good film")["input_ids"]) == [
        "[CLS]", "[UNK]", "[UNK]", "[SEP]"]
    assert jt.load(str(bert)).tokenizer is None


def test_training_on_text_without_a_tokenizer_names_the_directory_and_the_fix(bert, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in [("good film", "pos"),
                                                                                   ("bad film", "neg")] * 4))
    train, _ = jt.read(rows, kind="classification")
    tuned = jt.apply_plan(jt.load(str(bert)), jt.lora(rank=2, alpha=4))
    with pytest.raises(ValueError, match=_no_tokenizer(bert)):
        jt.Trainer(tuned, train, run_dir=tmp_path / "run", config=jt.TrainConfig(steps=1, progress=False),
                   data=jt.DataConfig(batch_size=4, max_length=16), eval=jt.EvalConfig(before=False, after=False)).fit()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_generating_from_text_without_a_tokenizer_names_the_directory(tmp_path):
    """A causal LM's directory holds generation_config.json beside its weights: still no tokenizer."""
    tiny_hf_model("LlamaForCausalLM", tmp_path / "llama")
    assert (tmp_path / "llama" / "generation_config.json").is_file()
    with pytest.raises(ValueError, match=_no_tokenizer(tmp_path / "llama")):
        jt.complete(jt.load(str(tmp_path / "llama")), ["hello"], max_new_tokens=2)


def test_a_tokenizer_given_encodes_as_autotokenizer_does(bert, tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    model = jt.load(str(bert), tokenizer=str(tmp_path / "tokenizer"))
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert model.tokenizer("good film")["input_ids"] == reference("good film")["input_ids"]


def test_prompt_init_from_text_without_a_tokenizer_names_the_rule_and_the_fix(tmp_path):
    """The prompt's text init fell back to transformers' tokenizer of the directory: for a weights-only
    directory the special tokens alone, so the virtual tokens started from the unknown token's row."""
    tiny_hf_model("LlamaForCausalLM", tmp_path / "llama")
    with pytest.raises(PlanError, match=r"init: text needs a tokenizer, and .*llama holds no tokenizer files"):
        jt.apply_plan(jt.load(str(tmp_path / "llama")), jt.prompt_tuning(4, init="text", text="Rate:"))
