"""``jaxtune.load``: a pretrained model and its tokenizer from wherever the user has it.

A model is named by an HF directory, a packaged model (``jaxtune.assets``: ``all-MiniLM-L6-v2``,
``SmolLM2-135M-Instruct``), a ``.gguf`` file (converted once into the cache) or a hub id (where
a hub is reachable). :class:`ModelConfig` is the ``model:`` section of a recipe and the keyword
arguments of :func:`load` alike, so YAML and Python say the same thing::

    model = load("SmolLM2-135M-Instruct", dtype="bfloat16")
    model = load(ModelConfig(path="runs/base-model", remat="block"))
    model = load("SmolLM2-135M-Instruct", adapter="runs/sft")   # start from an SFT run's adapters
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jaxtune.assets import cache_dir, fetch_package
from jaxtune.dtypes import DTYPES as DTYPES  # the names, shared with the command line (no JAX there)
from jaxtune.models import assets, hf
from jaxtune.schema import coerce

log = logging.getLogger(__name__)


def dtype_name(value: Any, where: str) -> str:
    """The name in :data:`DTYPES` of a dtype given by that name or as the dtype itself
    (``jnp.bfloat16``, ``np.float16``): the one check of every dtype the API takes, so that each
    refuses other spellings (``"bf16"``) alike, naming ``where`` and the names accepted."""
    if not isinstance(value, str):
        try:
            value = np.dtype(value).name
        except TypeError:
            pass  # not a dtype: refused below, as given
    return coerce(value, DTYPES, where)


def model_of(model: Any) -> Any:
    """``model`` itself, or the trained ``model`` of a ``Trainer.fit()`` result, which the API functions
    that take a model (:func:`jaxtune.export`, :func:`jaxtune.complete`) take as well. The result is the
    training layer's, which this one may not import: a model has a ``module``, a result holds one. Anything
    else comes back as it is, for the caller's check to name."""
    inner = getattr(model, "model", None)
    model = inner if not hasattr(model, "module") and hasattr(inner, "module") else model
    check_not_consumed(model)
    return model


def check_not_consumed(model: Any) -> None:
    """Refuse a model (anything with ``params``) whose trainable arrays an earlier ``fit`` consumed:
    the step donates them, so that a run holds one copy of what it trains rather than two. Without
    this, the first use of a consumed array is JAX's "Array has been deleted", which names neither."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(getattr(model, "params", None))[0]
    gone = next((path for path, x in leaves if isinstance(x, jax.Array) and x.is_deleted()), None)
    if gone is not None:
        raise ValueError(f"model: parameter {jax.tree_util.keystr(gone)} was consumed by an earlier fit (training "
                         "donates the trainable arrays to hold one copy of them); pass that fit's result (or its "
                         "result.model), or load and apply_plan again for a second run from the start")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The pretrained model and how it is held in memory.

    ``path``: an HF directory, a packaged model name (``jaxtune fetch`` lists them), a ``.gguf``
    file or a hub id. ``dtype``: the weights are read in it and the frozen ones stay in it;
    trainable ones are float32 from the values read (so a float32 checkpoint read in bfloat16
    starts its trained weights from bfloat16-rounded values). ``compute_dtype``: activations
    (default: ``dtype``). ``remat``: recompute
    activations in the backward pass (decoders): ``block`` keeps only each block's input,
    ``dots`` keeps matmul outputs, ``dots_no_batch`` those without batch dimensions (not
    attention's), ``offload`` keeps those in host memory (GPU/TPU; see ``layers.remat_policy``).
    ``unroll_layers``: a decoder's loop over its (stacked) layers unrolled in the compiled program
    (``true``), kept a loop (``false``), or ``auto``: unrolled for models of up to 8 layers on a
    single CPU device, whose steps it makes ~6-12 % faster (deeper stacks compile for longer
    unrolled and gain less; see ``DecoderConfig.unrolls``). Params and checkpoints are the same either way.
    ``tokenizer``: a directory or hub id, when the model's own directory has none.
    ``keep_quantized``: a GGUF model's Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K weights load as
    quantized frozen leaves (``jaxtune.models.gguf_quantized.load_quantized``) instead of dequantized.
    ``adapter``: trained adapters to start from (e.g. SFT before DPO): a PEFT
    adapter directory, or a jaxtune run directory whose final export is one (``<run>/export``);
    :func:`jaxtune.apply_plan` puts its tensors into the plan's leaves.
    ``router_aux_loss_coef``: the weight of a mixture-of-experts model's router load-balancing loss in the
    training loss (0: none). ``None`` (default) is the checkpoint's ``config.json``
    ``router_aux_loss_coef``, as TRL's SFTTrainer and DPOTrainer take it, and none under a classification or
    regression head, as transformers' ``*ForSequenceClassification``
    (:meth:`jaxtune.models.moe.MoeConfig.from_hf`). A model without a router refuses it.
    """

    path: str
    dtype: DTYPES = "float32"
    compute_dtype: DTYPES | None = None
    remat: Literal["none", "block", "dots", "dots_no_batch", "offload"] = "none"
    unroll_layers: Literal["auto"] | bool = "auto"
    tokenizer: str | None = None
    keep_quantized: bool = False
    adapter: str | None = None
    router_aux_loss_coef: float | None = None

    def family_fields(self) -> dict[str, Any]:
        """The fields of the family's own config this one sets (``remat``, ``unroll_layers``,
        ``router_aux_loss_coef``), for :func:`hf.build`: only where set, so that a family without them
        loads as before."""
        return {name: getattr(self, name)
                for name, default in (("remat", "none"), ("unroll_layers", "auto"), ("router_aux_loss_coef", None))
                if getattr(self, name) != default}

    def __post_init__(self) -> None:
        # YAML recipes are checked against the Literal types by the config reader; Python callers here.
        for name in ("dtype", "compute_dtype"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, dtype_name(getattr(self, name), f"model.{name}"))
        coef = coerce(self.router_aux_loss_coef, float | None, "model.router_aux_loss_coef")
        if coef is not None and not 0 <= coef < float("inf"):
            raise ValueError(f"model.router_aux_loss_coef: expected a number >= 0 (0: no router loss), got {coef!r}; "
                             "give the weight, or leave it out (null) to follow the model's config.json")
        object.__setattr__(self, "router_aux_loss_coef", coef)
        if not isinstance(self.keep_quantized, bool):
            raise ValueError(f"model.keep_quantized: expected true or false, got {self.keep_quantized!r}")
        if self.adapter is not None and not str(self.adapter).strip():
            raise ValueError("model.adapter: empty; give a PEFT adapter directory or a jaxtune run directory, or "
                             "leave it out")
        for name in ("path", "tokenizer"):
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                raise ValueError(f"model.{name}: empty; give a model directory, packaged model name, .gguf file or "
                                 "hub id")


class LoadError(ValueError):
    """The model cannot be found or read; the message names it and what to try."""


def refused_field(err: TypeError, overrides: dict[str, Any], directory: Path) -> LoadError | None:
    """The error naming the :meth:`ModelConfig.family_fields` field (of ``overrides``) whose family config
    refused it in ``err`` (the field named there, else the only one set), for the model in ``directory``;
    None when no field was set (``err`` is then another fault)."""
    name = next((name for name in overrides if repr(name) in str(err)), next(iter(overrides), None))
    if name == "router_aux_loss_coef":
        return LoadError(f"model.router_aux_loss_coef: {overrides[name]!r} weighs a mixture-of-experts model's router "
                         f"loss (Mixtral, Qwen2-MoE, Qwen3-MoE), and the model in {directory} has no router; leave "
                         "model.router_aux_loss_coef out")
    if name is not None:
        return LoadError(f"model.{name}: {overrides[name]!r} is not supported by the model in {directory} ({err}); "
                         f"leave model.{name} out")
    return None


def model_dir(path: str | os.PathLike[str]) -> Path:
    """A local HF directory for ``path``: a directory, a packaged model name, a GGUF file
    (converted once into ``<cache>/gguf/``) or a hub id."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.is_file() and local.suffix == ".gguf":
        return _gguf_dir(local)
    try:
        assets.resolve_model(str(path))
    except ValueError:
        try:
            return hf.resolve(path)
        except Exception as err:  # noqa: BLE001 - offline, no such id, ...: one message says it all
            names = ", ".join(name for name, _ in assets.list_models())
            raise LoadError(f"model {str(path)!r} is not a directory, a .gguf file, a packaged model ({names}) or a "
                            f"reachable hub id ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    return assets.fetch_model(str(path))


ADAPTER_CONFIG = "adapter_config.json"  # what makes a directory a PEFT adapter


def adapter_dir(path: str | os.PathLike[str]) -> Path:
    """The PEFT adapter directory ``path`` names: the directory itself, or a jaxtune run's final
    export (``<run>/export``). Raises :class:`LoadError` naming ``model.adapter`` and the fix."""
    local = Path(path).expanduser()
    if (local / ADAPTER_CONFIG).is_file():
        return local
    if (local / "export" / ADAPTER_CONFIG).is_file():
        return local / "export"
    if (local / "config.yaml").is_file():  # a run directory without a PEFT export
        raise LoadError(f"model.adapter: {local} is a jaxtune run without a PEFT adapter in {local / 'export'} (it "
                        "has not finished, or exported merged/gguf/none); finish it with output.export: peft, or give "
                        "its merged export as model.path instead")
    raise LoadError(f"model.adapter: {local} has no {ADAPTER_CONFIG}; give a PEFT adapter directory or a jaxtune run "
                    "directory that exported one")


GGUF_SOURCE = "gguf_source.json"  # in a converted directory without weights: {"gguf": the file}


def _gguf_dir(path: Path, *, weights: bool = True, reader: Any = None) -> Path:
    """An HF directory converted from a GGUF file once, keyed by the file's path, size and time and
    by the conversion's version (:data:`jaxtune.models.gguf.CONVERSION`: a fixed importer converts again).

    Without ``weights`` (``keep_quantized``, which reads the tensors from the file itself) only its
    configs and tokenizer are written, and :data:`GGUF_SOURCE` names the file; a full conversion
    made earlier serves as well. ``reader``: the file's :class:`gguf.GGUFReader` where the caller has one
    open (a parse is seconds for a large vocabulary); else the conversion opens it."""
    from jaxtune.models.gguf import CONVERSION, gguf_to_hf

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{CONVERSION}".encode()).hexdigest()[:16]
    full = cache_dir() / "gguf" / f"{path.stem}-{key}"
    out = full if weights or (full / "config.json").is_file() else full.with_name(full.name + "-meta")
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        gguf_to_hf(path, tmp, weights=weights, reader=reader)
        if not weights:
            (tmp / GGUF_SOURCE).write_text(json.dumps({"gguf": str(path.resolve())}))
        try:
            tmp.rename(out)  # atomic: the directory appears complete or not at all
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def base_model_name(source: str) -> str:
    """What an exported adapter names as its base (PEFT's ``base_model_name_or_path``): the model's
    directory, or for a GGUF model loaded ``keep_quantized`` from a file, that file (its directory
    holds no weights; transformers loads it with ``from_pretrained(folder, gguf_file=name)``)."""
    marker = Path(source) / GGUF_SOURCE
    return json.loads(marker.read_text())["gguf"] if marker.is_file() else source


def _quantized_dir(path: str, reader: Any = None) -> Path:
    """The configs and tokenizer of a GGUF model loaded ``keep_quantized``: a packaged model's
    directory, or a ``.gguf`` file's conversion without its (float32) weights (from ``reader``, the
    file's open :class:`gguf.GGUFReader`, when given)."""
    local = Path(path).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return _gguf_dir(local, weights=False, reader=reader)
    return model_dir(path)


def _gguf_file(path: str) -> Path:
    """The GGUF file behind ``path`` (a ``.gguf`` file or a packaged GGUF model), for keep_quantized."""
    local = Path(path).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return local
    try:
        asset = assets.resolve_model(str(path))
    except ValueError:
        asset = None
    if asset is None or not asset.path.endswith(".gguf"):
        raise LoadError(f"model.keep_quantized: {path!r} is not a GGUF model (only GGUF weights are stored "
                        "quantized); drop keep_quantized, and quantize a float model with a plan rule such as "
                        "{action: freeze, quantize: nf4}")
    return fetch_package(asset.package) / asset.path


def load_tokenizer(directory: Path, override: str | None = None) -> Any:
    """The transformers tokenizer of a model directory (or of ``override``); None for a directory that
    holds no tokenizer file at all (``config.json`` and weights alone).

    transformers builds such a directory the family's tokenizer of its special tokens alone (BERT's has 5),
    and every word then encodes as unknown: training ran, on nothing. Without one the model takes token
    ids; what needs to encode text (the data, a chat template, generation) names the directory and the
    fix (:func:`tokenizer_of`)."""
    from transformers import AutoTokenizer

    source = override or str(directory)
    local = Path(source) if Path(source).is_dir() else None
    if override is None and local is not None and not any((local / name).is_file() for name in _TOKENIZER_HELD):
        log.info("%s: no tokenizer files (tokenizer.json, tokenizer_config.json, a vocabulary): the model has no "
                 "tokenizer; give model.tokenizer to encode text", local)
        return None
    if local is not None:
        _check_sentencepiece_readable(local)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds; all mean "no tokenizer here"
        raise LoadError(f"{source}: no tokenizer could be loaded "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:160]}"
                        "); give model.tokenizer (a directory or hub id with tokenizer files)") from None
    if local is not None:
        _check_vocabulary_found(tokenizer, local)
    return tokenizer


# The files that say a directory holds a tokenizer (its class, its special tokens), beside its vocabulary.
_TOKENIZER_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
# Any of these makes a tokenizer directory (a generation config or chat template alone does not: transformers
# writes generation_config.json beside a causal LM's weights).
_TOKENIZER_HELD = tuple(name for name in hf.TOKENIZER_FILES
                        if name not in ("generation_config.json", "chat_template.jinja"))


def _module_missing(name: str) -> bool:
    try:
        importlib.import_module(name)  # transformers imports it next anyway
    except ImportError:
        return True
    return False


def _check_sentencepiece_readable(directory: Path) -> None:
    """A directory whose tokenizer is a SentencePiece model alone needs the packages that read it.

    Without them transformers logs a warning and falls back to reading the file as a tiktoken
    vocabulary, whose error ("`tiktoken` is required") names the wrong fix."""
    if (directory / "tokenizer.json").is_file():
        return
    found = [name for name in hf.SENTENCEPIECE_FILES if (directory / name).is_file()]
    missing = [name.split(".")[-1] for name in ("sentencepiece", "google.protobuf") if _module_missing(name)]
    if found and missing:
        raise LoadError(f"{directory}: its tokenizer is the SentencePiece model {found[0]} (no tokenizer.json), "
                        f"which transformers reads with the {' and '.join(missing)} package(s), not installed; "
                        f"pip install {' '.join(missing)} (jaxtune's own dependencies)")


def _check_vocabulary_found(tokenizer: Any, directory: Path) -> None:
    """Refuse a tokenizer transformers built from none of its vocabulary files.

    Given a tokenizer's configuration (``tokenizer_config.json``: its class, its special tokens) but
    none of its files, transformers builds one of the special tokens alone (DeBERTa-v2's has 7) and
    logs nothing; every word then encodes as unknown tokens. (A directory with no tokenizer files at
    all has no tokenizer: :func:`load_tokenizer`.)"""
    if not any((directory / name).is_file() for name in _TOKENIZER_CONFIGS):
        return
    names = set(type(tokenizer).vocab_files_names.values()) | {"tokenizer.json"}
    if not any((directory / name).is_file() for name in names):
        raise LoadError(f"{directory}: none of {type(tokenizer).__name__}'s vocabulary files "
                        f"({', '.join(sorted(names))}) is there, and transformers built a {len(tokenizer)}-token "
                        "tokenizer of its special tokens alone; copy the model's tokenizer files there, or give "
                        "model.tokenizer (a directory or hub id with tokenizer files)")


def tokenizer_of(model: Any) -> Any:
    """The tokenizer of ``model`` (a :class:`~jaxtune.models.hf.Pretrained` or a
    :class:`~jaxtune.tuning.tuned.Tuned`), for what encodes text; a model loaded without one (a directory
    of config.json and weights alone, an image model) is refused (:class:`LoadError`), naming its directory
    and how to give one."""
    if model.tokenizer is None:
        raise LoadError(f"{model.source}: the model has no tokenizer to encode text (its directory holds no "
                        "tokenizer files); give model.tokenizer: <directory or hub id with its tokenizer files> "
                        "in the recipe, or jaxtune.load(path, tokenizer=...) (jaxtune.apply_plan(..., tokenizer=...))")
    return model.tokenizer


def load(model: str | os.PathLike[str] | ModelConfig, *, on_host: bool = False, **options: Any) -> hf.Pretrained:
    """Load a pretrained model with its tokenizer.

    Args:
      model: a path, packaged name, GGUF file or hub id, or a :class:`ModelConfig`.
      on_host: keep the weights as host numpy arrays, on no device, for ``apply_plan`` and a Trainer
        that places each leaf once (what ``jaxtune train`` does: see
        :func:`jaxtune.models.hf.load_pretrained`); the default puts them on the default device.
      options: fields of :class:`ModelConfig` (``dtype``, ``compute_dtype``, ``remat``,
        ``unroll_layers``, ``tokenizer``, ``router_aux_loss_coef``...), overriding those of ``model``.

    Returns:
      A :class:`jaxtune.models.hf.Pretrained` whose ``tokenizer`` is set.
    """
    cfg = model if isinstance(model, ModelConfig) else ModelConfig(path=str(model))
    try:
        cfg = dataclasses.replace(cfg, **options)
    except TypeError as err:
        fields = ", ".join(f.name for f in dataclasses.fields(ModelConfig) if f.name != "path")
        raise TypeError(f"load(): {err}; options are {fields}") from None
    adapter = adapter_dir(cfg.adapter) if cfg.adapter is not None else None  # before the (slow) weights
    if cfg.keep_quantized:
        from jaxtune.models.gguf import open_gguf

        file = _gguf_file(cfg.path)
        reader = open_gguf(file)  # one parse: the first load's conversion (configs, tokenizer) reads it too
        directory = _quantized_dir(cfg.path, reader)
    else:
        directory = model_dir(cfg.path)
    overrides = cfg.family_fields()
    try:
        if cfg.keep_quantized:
            from jaxtune.models.gguf_quantized import load_quantized

            pretrained = load_quantized(file, directory, dtype=cfg.dtype, reader=reader, on_host=on_host,
                                        compute_dtype=cfg.compute_dtype, **overrides)
        else:
            pretrained = hf.load_pretrained(directory, dtype=cfg.dtype, compute_dtype=cfg.compute_dtype,
                                            on_host=on_host, **overrides)
    except TypeError as err:
        raise refused_field(err, overrides, directory) or err from None
    if getattr(pretrained.config, "modality", "text") != "image" or cfg.tokenizer:  # image models read pixels
        pretrained.tokenizer = load_tokenizer(directory, cfg.tokenizer)
    pretrained.adapter = adapter
    return pretrained
