"""The Rust tokenizer behind a Hugging Face fast tokenizer, as jaxtune.data encodes with it."""

from __future__ import annotations

import weakref
from typing import Any

from tokenizers import Tokenizer

_BACKENDS: weakref.WeakKeyDictionary[Any, Tokenizer] = weakref.WeakKeyDictionary()


def backend(tokenizer: Any) -> Tokenizer:
    """A private copy of a fast tokenizer's Rust backend with padding and truncation off.

    ``tokenizer(...)`` reconfigures the one shared backend on every call (padding,
    truncation), so calls from grain's reader threads could race; the copy is never
    reconfigured. It also skips the Python wrapper, and ignores padding that a
    ``tokenizer.json`` may switch on (MiniLM's pads to 128).
    """
    try:
        return _BACKENDS[tokenizer]
    except KeyError:
        pass
    shared = getattr(tokenizer, "backend_tokenizer", None)
    if shared is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; jaxtune.data needs one "
                         "(a tokenizer.json, as AutoTokenizer loads by default)")
    copy = Tokenizer.from_str(shared.to_str())
    copy.no_padding()
    copy.no_truncation()
    _BACKENDS[tokenizer] = copy
    return copy
