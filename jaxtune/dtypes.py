"""The dtype names the API takes (a model's ``dtype``/``compute_dtype``, merged and GGUF exports' weights).

One list for the library and the command line: ``jaxtune export --dtype`` offers these choices
while parsing, before anything imports JAX, so this module imports nothing of jaxtune's (or JAX).
:func:`jaxtune.models.load.dtype_name` is the check that reads a dtype into one of these names.
"""

from typing import Literal, get_args

DTYPES = Literal["float32", "bfloat16", "float16"]
DTYPE_NAMES: tuple[str, ...] = get_args(DTYPES)
# A GGUF export's weights: these, or llama.cpp's 8-bit blocks (jaxtune.models.gguf_export)
GGUF_DTYPES = Literal[DTYPES, "q8_0"]
GGUF_DTYPE_NAMES: tuple[str, ...] = get_args(GGUF_DTYPES)
