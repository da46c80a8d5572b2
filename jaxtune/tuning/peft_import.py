"""Import at the edges: an existing PEFT adapter read onto a loaded base model, ready to train further.

- :func:`load_peft`: a PEFT LoRA/DoRA or prompt-tuning adapter onto a loaded base model; the
  result's plan spells out what the adapter trains.
- :func:`apply_plan`: a plan applied to a loaded model, its trainable leaves starting from the
  adapter ``jaxtune.load(..., adapter=)`` names (``model.adapter``: SFT, then DPO from its adapters);
  :func:`start_from` copies them in.

On a tied model (SmolLM2, Qwen2.5) PEFT keeps ``embed_tokens`` and ``lm_head`` one matrix only with
``ensure_weight_tying``; otherwise a trained or adapted end leaves the other as it was, so import
unties them. Adapters whose meaning jaxtune cannot reproduce (PiSSA/OLoRA-style inits, LoRA on an
embedding, pickle files) are refused with the fix. The names and key layout shared with export come
from :mod:`jaxtune.tuning.peft_io`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxtune.models import hf, stacking
from jaxtune.models.layers import ADAPTER_LEAVES, MAGNITUDE
from jaxtune.models.load import ADAPTER_CONFIG
from jaxtune.tuning import tuned as planning
from jaxtune.tuning.labels import FROZEN, HEAD_KEY, PROMPT_LEAF, path_str
from jaxtune.tuning.partition import cast_by_label
from jaxtune.tuning.peft_io import (
    ADAPTER_WEIGHTS,
    PEFT_LEAVES,
    PREFIX,
    PROMPT_PREFIX,
    ExportError,
    Module,
    Params,
    family_of,
    hf_module_name,
    hf_module_names,
    modules_of,
    not_a_peft_linear,
)
from jaxtune.tuning.plan import Plan, Rule
from jaxtune.tuning.tuned import Tuned

# Keys of adapter tensors (everything else in an adapter file is a modules_to_save tensor).
_ADAPTER_KEY = re.compile(r"\.(lora_A|lora_B)\.weight$|\.lora_magnitude_vector(\.weight)?$")
# Infix of the frozen base tensor that PEFT writes for an adapted lm_head/embed_tokens.
_BASE_LAYER = ".base_layer."
# init_lora_weights values that only choose the starting A/B, leaving the base weights alone: the saved
# adapter then means W + s * B @ A on the original base, as jaxtune computes it.
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
# Inits that subtract the initial adapter from the base weights; PEFT converts them at save time.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga")
# LoRA options jaxtune does not implement; an adapter that sets one is refused rather than misread.
_UNSUPPORTED = ("layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters", "lora_bias",
                "use_qalora", "trainable_token_indices", "layer_replication", "megatron_config",
                "alora_invocation_tokens")


log = logging.getLogger(__name__)


def _pattern_value(config: dict[str, Any], field: str, name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` (``field``) lookup for module ``name``
    (``peft.utils.other.get_pattern_key``)."""
    for key, value in (config.get(field) or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as err:
            raise ExportError(f"{ADAPTER_CONFIG}: {field} key {key!r} is not a valid regular expression "
                              f"({err})") from None
    return default


def _targeted(target_modules: str | list[str], name: str) -> bool:
    """PEFT's ``target_modules`` rule: a regex is full-matched, a list entry equals or ends the name."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _exact(modules: list[Module]) -> str:
    return "^(" + "|".join(re.escape(path_str(m)) for m in modules) + ")$"


def load_peft(
    pretrained: hf.Pretrained,
    adapter_dir: str | Path,
    rng: jax.Array | None = None,
    *,
    frozen_dtype: Any | None = None,
    head: Rule | None = None,
) -> Tuned:
    """Load a PEFT LoRA/DoRA or prompt-tuning adapter onto ``pretrained`` to continue training.

    The returned :class:`Tuned` has the adapter's leaves (and ``modules_to_save`` modules)
    trainable and everything else frozen; its ``plan`` spells that out as rules.

    Args:
      head: a head rule for a bare encoder (``BertModel``) whose adapter saves no head of its own
        (PEFT's ``FEATURE_EXTRACTION``): the model has no output layer to train otherwise. The head
        is new (initialised from ``rng``). Unused where the adapter saves a head or the model has
        an output layer (a decoder's LM head, a classifier checkpoint's own).
    """
    return _load_peft(pretrained, adapter_dir, rng, frozen_dtype, head)[0]


def _load_peft(pretrained: hf.Pretrained, adapter_dir: str | Path, rng: jax.Array | None, frozen_dtype: Any | None,
               head: Rule | None) -> tuple[Tuned, bool]:
    """:func:`load_peft`'s result, and whether its head is the ``head`` rule's (new, not the adapter's)."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.exists():
        raise ExportError(f"{adapter_dir}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{config_path}:{err.lineno}: not valid JSON ({err.msg}); save the adapter again with "
                          "PEFT's save_pretrained") from None
    if not isinstance(config, dict):
        raise ExportError(f"{config_path}: expected a JSON object (PEFT's adapter config), got a "
                          f"{type(config).__name__}")
    kind = config.get("peft_type")
    if kind not in ("LORA", "PROMPT_TUNING"):
        raise ExportError(f"{config_path}: peft_type {kind!r} is not supported; jaxtune reads LORA and PROMPT_TUNING")
    set_options = [k for k in _UNSUPPORTED if config.get(k) not in (None, False, [], {}, "")]
    if kind == "LORA" and (set_options or config.get("bias", "none") != "none"):
        raise ExportError(f"{config_path}: option(s) {set_options or ['bias']} are not supported by jaxtune")
    if kind == "LORA":
        _check_init(config, config_path)
    reader = hf.SafetensorsReader([_weights_file(adapter_dir)])
    prefix = PREFIX if kind == "LORA" else PROMPT_PREFIX
    aliases = _older_names(pretrained)
    keys = {_as_now(k.removeprefix(prefix), aliases): k for k in reader.names()}
    _refuse_embedding_lora(keys, adapter_dir)

    # modules_to_save tensors are the base-layout tensors: anything that is no adapter leaf (PEFT also
    # writes the frozen base of an adapted lm_head/embed_tokens as "<module>.base_layer.weight").
    saved = {k.rsplit(".", 1)[0] for k in keys
             if k != "prompt_embeddings" and not _ADAPTER_KEY.search(k) and _BASE_LAYER not in k}
    pretrained, tied_copy = _tying(pretrained, config, saved, keys)
    if tied_copy is not None:
        saved.discard(tied_copy.rsplit(".", 1)[0])
        del keys[tied_copy]
    rules: list[Rule] = []
    # The output layer of the family's HF classifier: an adapter that saves it brings a head.
    classifier = getattr(pretrained.config, "classifier_layout", None)
    head_out = classifier.out if classifier is not None else "score"
    if head_out in saved and hf.FAMILIES[pretrained.architecture].body is None:
        _refuse_missing_pooler(pretrained, adapter_dir, classifier)
        num = reader.shape(f"{prefix}{head_out}.weight")[0]
        rules.append(Rule("head", task="regression" if num == 1 else "classification", num_labels=num,
                          bias=f"{head_out}.bias" in keys))
    head_is_given = head is not None and not rules and not planning.has_output_layer(pretrained)
    if head_is_given:
        rules.append(head)
    layout = planning.apply_plan(pretrained, Plan(tuple(rules)))  # the tree the adapter will be laid onto
    # The adapter of a bare encoder names modules as the bare model does, whatever head the plan adds.
    def named(t: Tuned) -> Tuned:
        return dataclasses.replace(t, head=None) if head_is_given else t

    layout_modules = modules_of(stacking.unstack(layout.params, lazy=True))  # the names only: nothing sliced
    by_name = hf_module_names(named(layout), list(layout_modules))
    unknown = sorted(saved - set(by_name))
    if unknown:
        raise ExportError(f"{adapter_dir}: modules_to_save {unknown[:5]} are not modules of {pretrained.architecture}")
    if layout.head_is_new and not head_is_given:
        _refuse_unsaved_head_modules(layout, by_name, saved, keys, adapter_dir)
    if kind == "LORA":
        # What PEFT's target_modules can match in the transformers model: no fused MoE experts or router,
        # and no pooler where the classifier has none (RoBERTa's reads the first token; jaxtune keeps it),
        # unless the file adapts it (jaxtune's own export of a plan that adapted the unused pooler).
        no_pooler = layout.head is not None and not layout.is_decoder and layout.head.pooling != "pooler"
        linears = {n: m for n, m in by_name.items() if "kernel" in layout_modules[m]
                   and not not_a_peft_linear(family_of(layout), m)
                   and not (no_pooler and m[0] == "pooler" and f"{n}.lora_A.weight" not in keys)}
        rules += _lora_rules(config, linears, saved, pretrained, {now: old for old, now in aliases.items()})
    else:
        if config.get("num_transformer_submodules", 1) != 1:
            raise ExportError(f"{config_path}: num_transformer_submodules must be 1 for a decoder")
        if not isinstance(config.get("num_virtual_tokens"), int) or config["num_virtual_tokens"] < 1:
            raise ExportError(f"{config_path}: num_virtual_tokens must be a positive integer (the prompt's length), "
                              f"got {config.get('num_virtual_tokens')!r}")
        rules.append(Rule("prompt", n_tokens=config["num_virtual_tokens"]))
    # A head the adapter brings is created (trainable) by its head rule; other saved modules train.
    trained = [by_name[n] for n in sorted(saved) if not (by_name[n][0] == HEAD_KEY and layout.head_is_new)]
    if trained:
        rules.append(Rule("train", match=_exact(trained)))
    tuned = planning.apply_plan(pretrained, Plan(tuple(rules)), rng)
    tuned.params = cast_by_label(_fill(named(tuned), reader, keys, by_name, adapter_dir), tuned.labels, frozen_dtype)
    return tuned, head_is_given


def apply_plan(pretrained: hf.Pretrained, plan: Any, rng: jax.Array | None = None, **options: Any) -> Tuned:
    """Apply ``plan`` to ``pretrained`` (:func:`jaxtune.tuning.tuned.apply_plan`, same arguments);
    when ``pretrained.adapter`` is set (``jaxtune.load(..., adapter=)``, ``model.adapter``), the
    trainable leaves then start from that PEFT adapter.

    The plan still says what trains; the adapter says where it starts. Every tensor of the adapter
    must land on a leaf the plan trains, with the same adapter kind, rank, alpha and rsLoRA flag
    (so give the plan the adapter was trained with); trained leaves the adapter lacks keep the
    plan's initial values. Nothing of the adapter is dropped: a tensor with no such leaf is an
    :class:`ExportError` naming its param path.
    """
    planning.check_pretrained(pretrained)  # before reading its adapter
    adapter = pretrained.adapter
    pretrained = dataclasses.replace(pretrained, adapter=None)
    planned = planning.apply_plan(pretrained, plan, rng, **options)
    if adapter is None:
        return planned
    # An adapter without a head is laid out under the plan's head (a bare encoder has no output layer
    # otherwise); that head then starts as the plan initialises it, not from the adapter.
    head = next((r for r in reversed(planned.plan.rules) if r.action == "head"), None)
    loaded, head_is_planned = _load_peft(pretrained, adapter, None, options.get("frozen_dtype"), head)
    return start_from(planned, loaded, adapter, head=not head_is_planned)


def _refuse_missing_pooler(pretrained: hf.Pretrained, adapter_dir: Path, classifier: Any) -> None:
    """Refuse an adapter that saves the family's HF classifier (its ``classifier`` layout, None for a
    decoder's score) where it reads the pooler output, onto a bare checkpoint with no pooler.

    A masked-LM checkpoint (``BertForMaskedLM``) saves no ``pooler.dense``; a head on it pools the first
    token instead, so the classifier had no place in it, and the refusal named ``classifier`` as no module
    of ``BertModel``, which it is, on a checkpoint with a pooler."""
    if classifier is None or classifier.pooling != "pooler" or "pooler" in pretrained.params:
        return
    family = hf.FAMILIES[pretrained.architecture]
    with_pooler = family.base or pretrained.architecture
    saved_as = (pretrained.hf_config.get("architectures") or [pretrained.architecture])[0]
    raise ExportError(
        f"{adapter_dir}: the adapter saves {family.classifier}'s {classifier.out!r}, which reads the pooler output, "
        f"and the base checkpoint {pretrained.source} has no pooler tensors (pooler.dense; its {saved_as} saved "
        "none); load the adapter onto a "
        f"{with_pooler} or {family.classifier} checkpoint that has them (the one it was trained on), or train "
        "a new head on this one (a plan head rule; it pools the first token, as there is no pooler) without the "
        "adapter's classifier")


def _refuse_unsaved_head_modules(layout: Tuned, by_name: dict[str, Module], saved: set[str],
                                 keys: dict[str, str], adapter_dir: Path) -> None:
    """Refuse an adapter that saves its classifier but not a head module before it.

    The HF classifier initialises such a module fresh (DeBERTa's ``pooler.dense``: PEFT's ``SEQ_CLS``
    saves only ``classifier``), and PEFT trained the classifier on those random weights, or put LoRA on
    them (target ``dense``); they are in no file, so no model rebuilt from the adapter, PEFT's or
    jaxtune's, is the one trained. Imported onto jaxtune's own fresh head it ran with other logits."""
    missing = sorted(n for n, m in by_name.items() if m[0] == HEAD_KEY and n not in saved)
    if not missing:
        return
    adapted = [n for n in missing if f"{n}.lora_A.weight" in keys]
    how = f"; it also puts LoRA on {adapted}, whose base weights are not saved either" if adapted else ""
    top = sorted({n.split(".")[0] for n in missing})
    raise ExportError(
        f"{adapter_dir}: the adapter saves the classifier but not {missing} before it, which "
        f"{layout.hf_architecture} initialises fresh{how}, so no model rebuilt from it is the trained one; "
        "merge it in PEFT, where the trained model is (model.merge_and_unload().save_pretrained(dir)), and load "
        f"that, or train it again with LoraConfig(modules_to_save={['classifier', *top]!r})")


def _describe_adapter(tuned: Tuned, module: Module) -> str:
    spec = tuned.adapters.get(module)
    if spec is None:
        return "no adapter"
    return f"{spec.kind} rank {spec.rank} alpha {spec.alpha:g}" + (" rslora" if spec.rslora else "")


def start_from(planned: Tuned, loaded: Tuned, adapter_dir: str | Path, *, head: bool = True) -> Tuned:
    """``planned`` with every trainable leaf of ``loaded`` (a :func:`load_peft` result) copied in;
    with ``head=False`` the head's leaves keep ``planned``'s values (``loaded``'s head is not the adapter's).

    Raises :class:`ExportError` (one line, naming ``model.adapter``, the param path and the fix)
    when a loaded leaf has no trainable leaf of the same shape and adapter spec in ``planned``.
    """
    # Compared layer by layer (the logical tree: adapters are planned per layer), then stacked back: the
    # layers left as planned (the frozen base) go back into their arrays, not into copies (stacking.Layer).
    flat, labels = (flatten_dict(stacking.unstack(planned.params, lazy=True)),
                    flatten_dict(stacking.unstack(planned.labels)))
    values = flatten_dict(stacking.unstack(loaded.params, lazy=True))
    fix = "give the plan the adapter was trained with (the SFT run's plan)"
    for path, label in flatten_dict(stacking.unstack(loaded.labels)).items():
        if label == FROZEN or (not head and path[0] == HEAD_KEY):
            continue
        where = f"model.adapter: {adapter_dir} trains {path_str(path)}"
        module = path[:-1]
        if path[-1] in ADAPTER_LEAVES and loaded.adapters.get(module) != planned.adapters.get(module):
            raise ExportError(f"{where} as {_describe_adapter(loaded, module)}, but the plan gives it "
                              f"{_describe_adapter(planned, module)}; {fix}")
        if labels.get(path, FROZEN) == FROZEN:
            raise ExportError(f"{where}, which the plan {'freezes' if path in labels else 'does not have'}; {fix}")
        value = values[path]
        if value.shape != flat[path].shape:
            raise ExportError(f"{where} with shape {tuple(value.shape)}, but the plan's leaf has "
                              f"{tuple(flat[path].shape)}; {fix}")
        flat[path] = jnp.asarray(stacking.materialize(value), flat[path].dtype)
    log.info("model.adapter: the plan's trainable leaves start from %s", adapter_dir)
    return dataclasses.replace(planned, params=stacking.to_physical(unflatten_dict(flat), planned.config))


def _weights_file(adapter_dir: Path) -> Path:
    """``adapter_model.safetensors``; a pickle ``adapter_model.bin`` is refused, as base weights are."""
    path, bin_path = adapter_dir / ADAPTER_WEIGHTS, adapter_dir / "adapter_model.bin"
    if path.exists():
        return path
    if bin_path.exists():
        raise ExportError(
            f"{bin_path}: a pickle file; jaxtune refuses pickle on purpose because unpickling runs arbitrary code. "
            "Convert once where you trust the file: python -c \"import torch; from safetensors.torch import save_file; "
            f"save_file(torch.load('{bin_path}', weights_only=True), '{path}', metadata={{'format': 'pt'}})\"")
    raise ExportError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}; a PEFT adapter directory holds its weights there")


def _check_init(config: dict[str, Any], config_path: Path) -> None:
    """Refuse adapters whose meaning depends on an initialisation jaxtune does not reproduce.

    PiSSA/OLoRA/CorDA/LoRA-GA subtract the initial adapter from the base weights, so their A/B are
    wrong on the original base (silently: the shapes fit); LoftQ needs its quantized residual base.
    """
    init = config.get("init_lora_weights", True)
    if any(init is plain or (isinstance(plain, str) and init == plain) for plain in _PLAIN_INITS):
        return
    if str(init).lower().startswith(_BASE_CHANGING_INITS):
        raise ExportError(
            f"{config_path}: init_lora_weights={init!r} changed the base weights when the adapter was made, so it is "
            "wrong on the original base; have PEFT convert it to a plain LoRA adapter when saving: "
            "model.save_pretrained(out, path_initial_model_for_weight_conversion=<the adapter saved right after "
            "get_peft_model, before training>), then load that")
    raise ExportError(
        f"{config_path}: init_lora_weights={init!r} is not reproduced by jaxtune (it changes the base weights or the "
        "LoRA forward); merge the adapter in PEFT (model.merge_and_unload().save_pretrained(dir)) and load the "
        "merged model")


def _refuse_embedding_lora(keys: dict[str, str], adapter_dir: Path) -> None:
    """PEFT's LoRA on an embedding (``lora_embedding_A/B``) adds ``s * (A^T B^T)[ids]`` to the lookup;
    jaxtune's adapters are linear-only, so such an adapter is refused rather than misread."""
    modules = sorted({k.split(".lora_embedding_")[0] for k in keys if ".lora_embedding_" in k})
    if modules:
        raise ExportError(
            f"{adapter_dir / ADAPTER_WEIGHTS}: LoRA on embedding(s) {modules} (lora_embedding_A/B) is not supported, "
            "jaxtune adapts linear layers only; merge it in PEFT (model.merge_and_unload().save_pretrained(dir)) "
            "and load that, or train the embedding whole (modules_to_save=['embed_tokens'])")


def _tying(pretrained: hf.Pretrained, config: dict[str, Any], saved: set[str],
           keys: dict[str, str]) -> tuple[hf.Pretrained, str | None]:
    """``pretrained`` as PEFT sees it under this adapter, and the key of a redundant tied copy to skip.

    On a tied model PEFT trains (``modules_to_save``) or adapts ``embed_tokens`` and ``lm_head`` apart,
    so the other end keeps the old matrix: jaxtune then unties them. Only ``ensure_weight_tying`` with
    a trained ``embed_tokens`` keeps them one matrix; PEFT then also writes lm_head's (equal) copy.
    """
    if not getattr(pretrained.config, "tie_word_embeddings", False):
        return pretrained, None
    name = hf.FAMILIES[pretrained.architecture].hf_module
    embedding, lm_head = name(("embed_tokens",)), name(("lm_head",))
    lm_head_lora = f"{lm_head}.lora_A.weight" in keys
    if not lm_head_lora and not saved & {embedding, lm_head}:
        return pretrained, None
    if config.get("ensure_weight_tying") and embedding in saved and not lm_head_lora:
        return pretrained, f"{lm_head}.weight" if f"{lm_head}.weight" in keys else None
    return hf.untie_embeddings(pretrained, trained_head=lm_head in saved), None


def _older_names(pretrained: hf.Pretrained) -> dict[str, str]:
    """Module name as an older transformers named it -> its name now, for the modules whose tensors the
    family's checkpoints store under another name (GPT-NeoX's ``lm_head`` was ``embed_out`` in transformers
    4): an adapter saved then names the module (``modules_to_save``, its LoRA tensors) the old way."""
    rename = hf.FAMILIES[pretrained.architecture].checkpoint_name
    if rename is None:
        return {}
    name = hf.FAMILIES[pretrained.architecture].hf_module
    shapes = jax.eval_shape(stacking.unstack, pretrained.params)  # the names only: no per-layer slices made
    now = {name(m) for m in modules_of(shapes)}
    if getattr(pretrained.config, "tie_word_embeddings", False):  # PEFT unties the output layer it trains
        now.add(name(("lm_head",)))
    old = {n: rename(n + ".weight").removesuffix(".weight") for n in now}
    return {o: n for n, o in old.items() if o != n and o not in now}


def _as_now(key: str, aliases: dict[str, str]) -> str:
    """An adapter tensor key (``embed_out.lora_A.weight``) with its module named as now (``lm_head...``)."""
    for old, now in aliases.items():
        if key.startswith(old + "."):
            return now + key[len(old):]
    return key


def _lora_rules(config: dict[str, Any], linears: dict[str, Module], saved: set[str],
                pretrained: hf.Pretrained, older: dict[str, str]) -> list[Rule]:
    """One lora/dora rule per (rank, alpha) group of the linear modules the adapter targets; ``older``:
    module name now -> the name an older transformers gave it, which the adapter's config may use."""
    targets = config.get("target_modules") or []
    groups: dict[tuple[int, float], list[Module]] = {}
    for name, module in linears.items():
        as_saved = older.get(name, name)
        if name in saved or not (_targeted(targets, name) or _targeted(targets, as_saved)):
            continue
        # PEFT's LoraConfig defaults (r=8, lora_alpha=8) where the file leaves them out, as PEFT reads it.
        rank = int(_pattern_value(config, "rank_pattern", name,
                                  _pattern_value(config, "rank_pattern", as_saved, config.get("r", 8))))
        alpha = float(_pattern_value(config, "alpha_pattern", name,
                                     _pattern_value(config, "alpha_pattern", as_saved, config.get("lora_alpha", 8))))
        groups.setdefault((rank, alpha), []).append(module)
    if not groups:
        raise ExportError(f"adapter target_modules {targets!r} match no linear module of {pretrained.architecture}")
    action = "dora" if config.get("use_dora") else "lora"
    return [Rule(action, match=_exact(modules), targets=None, rank=rank, alpha=alpha,
                 dropout=float(config.get("lora_dropout") or 0.0), rslora=bool(config.get("use_rslora")))
            for (rank, alpha), modules in sorted(groups.items())]


def _fill(tuned: Tuned, reader: hf.SafetensorsReader, keys: dict[str, str], by_name: dict[str, Module],
          adapter_dir: Path) -> Params:
    """``tuned.params`` with every tensor of the adapter file put in its leaf (shapes checked)."""
    flat = flatten_dict(stacking.unstack(tuned.params, lazy=True))  # the leaves left as they are stack back
    wanted = {}  # leaf path -> (key, transpose)
    for module in tuned.adapters:
        name = hf_module_name(tuned, module)
        for leaf, (suffix, transpose) in PEFT_LEAVES.items():
            if module + (leaf,) in flat:
                key = f"{name}.{suffix}"
                key = key if key in keys or leaf != MAGNITUDE else key + ".weight"
                wanted[module + (leaf,)] = (key, transpose)
    for name in keys:
        if name == "prompt_embeddings":
            wanted[(PROMPT_LEAF,)] = (name, False)
        elif not _ADAPTER_KEY.search(name):
            module, leaf = name.replace(_BASE_LAYER, ".").rsplit(".", 1)
            base_leaf = "bias" if leaf == "bias" else next(
                (k for k in ("kernel", "embedding", "scale") if by_name[module] + (k,) in flat), None)
            if base_leaf is None:
                raise ExportError(f"{adapter_dir / ADAPTER_WEIGHTS}: tensor {name} is no module's weight in "
                                  f"{tuned.architecture} (a bare parameter PEFT cannot save); remove it from the "
                                  "adapter")
            path = by_name[module] + (base_leaf,)
            wanted[path] = (name, hf.stored_transposed(family_of(tuned), path))
    used = {key for key, _ in wanted.values()}
    missing, unused = sorted(used - set(keys)), sorted(set(keys) - used)
    if missing or unused:
        raise ExportError(f"{adapter_dir / ADAPTER_WEIGHTS}: " + (f"missing tensor(s) {missing[:5]}" if missing else
                          f"tensor(s) {unused[:5]} belong to no adapter jaxtune built from {ADAPTER_CONFIG}"))
    for path, (key, transpose) in wanted.items():
        value = np.asarray(reader[keys[key]], dtype=np.float32)
        need = flat[path].shape[::-1] if transpose else flat[path].shape  # in the file's (PyTorch) layout
        if value.shape != need:
            raise ExportError(f"{adapter_dir / ADAPTER_WEIGHTS}: tensor {key} has shape {value.shape}, but "
                              f"{path_str(path)} needs {need}")
        value = value.T if transpose else value
        flat[path] = jnp.asarray(value, dtype=flat[path].dtype)
    return stacking.to_physical(unflatten_dict(flat), tuned.config)
