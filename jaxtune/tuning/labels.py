"""Resolving a plan against a param tree: which linears get adapters, and one label per leaf.

Paths are tuples of keys (``("layers_0", "mlp", "up_proj", "kernel")``), shown joined by ``/``.
Labels are strings: ``freeze`` or a trainable group (``train``, ``lora``, ``dora``, ``prompt``,
``head``). The label of a trainable leaf follows what the leaf *is* (its "natural" group), so a
``train`` rule over an adapter keeps it in the ``lora`` group and per-group learning rates work.
Model state (BatchNorm statistics) is ``state`` where its module's ``scale`` trains (the train step
updates it from the batches) and ``freeze`` elsewhere; a ``freeze`` rule that selects statistics
(``match: running_``) keeps them frozen where their BatchNorm trains (frozen-statistics fine-tuning).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from jaxtune.models.efficientnet import STATE_LEAVES
from jaxtune.models.layers import ADAPTER_LEAVES, LORA_A, LORA_B, LORA_SCALE, MAGNITUDE
from jaxtune.tuning.lora import AdapterSpec
from jaxtune.tuning.plan import Plan, PlanError, Rule, block_indices

log = logging.getLogger(__name__)

Path = tuple[str, ...]
FROZEN = "freeze"
STATE = "state"  # model state a training stage updates from its batches, not by gradient
GROUPS = ("train", "lora", "dora", "prompt", "head", STATE)
PROMPT_LEAF = "prompt_embeddings"
HEAD_KEY = "head"
# Output layers that "all-linear" leaves alone, as PEFT does (it never adapts the output embedding
# or a sequence-classification head).
_NOT_ALL_LINEAR = ("lm_head", HEAD_KEY)
_BLOCK_RE = re.compile(r"^(?:layers|layer)_(\d+)$")


def path_str(path: Path) -> str:
    return "/".join(path)


def natural_label(path: Path) -> str:
    """The group a leaf belongs to when trainable."""
    leaf = path[-1]
    if leaf == LORA_SCALE or leaf in STATE_LEAVES:
        return FROZEN  # a constant (alpha / r), or BatchNorm statistics (model state, never trained)
    if leaf in (LORA_A, LORA_B):
        return "lora"
    if leaf == MAGNITUDE:
        return "dora"
    if path[0] == HEAD_KEY:
        return "head"
    if path[0] == PROMPT_LEAF:
        return "prompt"
    return "train"


def block_of(path: Path) -> int | None:
    """Index of the body transformer block holding this path (``layers_3`` / ``layer_3``), or None."""
    m = _BLOCK_RE.match(path[0])
    return int(m.group(1)) if m else None


def leaf_kinds(path: Path) -> frozenset[str]:
    """The module kinds of a leaf in the decoder/encoder param trees (a leaf may have several:
    BERT's ``embeddings/LayerNorm`` is both ``embeddings`` and ``norms``)."""
    if path[0] == PROMPT_LEAF:
        return frozenset({"prompt"})
    if path[0] == HEAD_KEY:
        return frozenset({"head"})
    modules = path[:-1]
    kinds = set()
    if path[-1] == "embedding" or path[0] == "embeddings":
        kinds.add("embeddings")
    if modules and ("norm" in modules[-1].lower() or modules[-1].startswith("ln_")  # GPT-2: ln_1, ln_2
                    or re.fullmatch(r"bn\d+", modules[-1])):  # bnN: BatchNorm
        kinds.add("norms")
    if "self_attn" in modules or "attention" in modules or "attn" in modules:
        kinds.add("attention")
    # Decoder MLPs live under mlp/ (DistilBERT: ffn/); BERT's feed-forward is intermediate/ + the block's output/.
    if ("mlp" in modules or "ffn" in modules or "intermediate" in modules
            or (block_of(path) is not None and modules[1:2] == ("output",))):
        kinds.add("mlp")
    # layernorm: ViT's final norm; final_norm: ModernBERT's; conv_head/bn1: what follows EfficientNet's last block
    if path[0] in ("lm_head", "norm", "pooler", "layernorm", "final_norm", "conv_head", "bn1"):
        kinds.add("output")
    if path[0] == "pooler":
        kinds.add("pooler")
    return frozenset(kinds)


def example_paths(paths: Iterable[Path], limit: int = 10) -> str:
    """A few real paths for error messages: everything outside blocks, then block 0's leaves."""
    paths = list(paths)
    outside = [p for p in paths if block_of(p) is None]
    first = [p for p in paths if block_of(p) == 0]
    shown = (outside[:4] + first)[:limit]
    return ", ".join(path_str(p) for p in shown) + (" ..." if len(paths) > len(shown) else "")


def _selects(rule: Rule, path: Path, blocks: set[int] | None) -> bool:
    """Whether the selectors of ``rule`` (``match``, ``blocks``, ``kinds``) all accept ``path``
    (a leaf path, or a module path for adapters)."""
    if rule.match is not None:
        text = path_str(path)
        module = path_str(path[:-1])
        if not (re.search(rule.match, text) or (module and re.search(rule.match, module))):
            return False
    if blocks is not None and block_of(path) not in blocks:
        return False
    if rule.kinds is not None and not leaf_kinds(path) & set(rule.kinds):
        return False
    return True


def _rule_blocks(plan: Plan, index: int, num_blocks: int) -> set[int] | None:
    rule = plan.rules[index]
    if rule.blocks is None:
        return None
    try:
        return set(block_indices(rule.blocks, num_blocks))
    except PlanError as err:
        raise PlanError(f"{plan.describe(index)}: {err}") from None


def _adapter_modules(plan: Plan, index: int, paths: list[Path], num_blocks: int) -> list[Path]:
    """The linear modules (module paths) that lora/dora rule ``index`` adapts; never empty."""
    rule = plan.rules[index]
    linears = [p[:-1] for p in paths if p[-1] == "kernel"]
    blocks = _rule_blocks(plan, index, num_blocks)
    chosen = [m for m in linears if _selects(rule, m + ("kernel",), blocks)]
    targets = rule.targets if rule.targets is not None else ("all-linear" if rule.match is None else None)
    if targets == "all-linear":
        chosen = [m for m in chosen if m[0] not in _NOT_ALL_LINEAR]
    elif targets is not None:
        # PEFT's rule for target names: the dotted module name equals the target or ends with ".target".
        def named(m: Path, target: str) -> bool:
            name = ".".join(m)
            return name == target or name.endswith("." + target)

        for target in targets:
            if not any(named(m, target) for m in linears):
                raise PlanError(f"{plan.describe(index)}: unknown target module {target!r}; linear modules in "
                                f"this model: {', '.join(sorted({m[-1] for m in linears}))}")
        chosen = [m for m in chosen if any(named(m, t) for t in targets)]
    if not chosen:
        raise PlanError(f"{plan.describe(index)} selects no linear module; linear modules are e.g. "
                        f"{example_paths(linears, 8)}; some param paths: {example_paths(paths)}")
    return chosen


def resolve_adapters(plan: Plan, paths: Iterable[Path], num_blocks: int) -> dict[Path, AdapterSpec]:
    """The adapter of each linear module (module path -> spec); later lora/dora rules override.

    ``paths`` are the leaf paths of the tree before adapters. Raises :class:`PlanError` for a
    rule that selects no linear, an unknown target name, or conflicting adapter dropouts.
    """
    paths = list(paths)
    adapters: dict[Path, AdapterSpec] = {}
    owner: dict[Path, int] = {}
    dropouts: dict[float, int] = {}
    for i, rule in enumerate(plan.rules):
        if rule.action not in ("lora", "dora"):
            continue
        chosen = _adapter_modules(plan, i, paths, num_blocks)
        owner.update({m: i for m in chosen})
        dropouts.setdefault(float(rule.dropout or 0.0), i)
        if len(dropouts) > 1:
            (a, ia), (b, ib) = list(dropouts.items())[:2]
            raise PlanError(f"{plan.describe(ia)} and {plan.describe(ib)} ask for adapter dropout {a} and {b}; "
                            "adapter dropout is one value per model")
        rank = rule.rank or 8
        spec = AdapterSpec(rule.action, rank, float(rule.alpha if rule.alpha is not None else rank), bool(rule.rslora))
        adapters.update({m: spec for m in chosen})
    owners = set(owner.values())
    for i, rule in enumerate(plan.rules):
        if rule.action in ("lora", "dora") and i not in owners:
            log.warning("%s has no effect: later adapter rules re-plan every module it adapts", plan.describe(i))
    return adapters


def adapter_dropout(plan: Plan) -> float:
    """The model-wide adapter dropout (conflicts were rejected by :func:`resolve_adapters`)."""
    return max((float(r.dropout or 0.0) for r in plan.rules if r.action in ("lora", "dora")), default=0.0)


def resolve_labels(plan: Plan, paths: Iterable[Path], num_blocks: int) -> dict[Path, str]:
    """One label per leaf path of the full tree (adapters, head and prompt included).

    Every leaf starts frozen; rules apply in order. ``train``/``freeze`` set the natural group
    or ``freeze`` on the leaves they select; ``lora``/``dora`` freeze their modules' base leaves
    and enable their adapters; ``prompt``/``head`` enable the leaves they created.
    """
    paths = list(paths)
    labels = {p: FROZEN for p in paths}
    pinned: set[Path] = set()  # statistics a freeze rule names: they stay frozen where their BatchNorm trains
    base = [p for p in paths if p[-1] not in ADAPTER_LEAVES]  # the tree adapters were resolved on
    adapted = {p[:-1] for p in paths if p[-1] == LORA_A}  # a rule's modules that are not linears got none
    for i, rule in enumerate(plan.rules):
        if rule.action == "prompt":
            chosen = [p for p in paths if p[0] == PROMPT_LEAF]
        elif rule.action == "head":
            chosen = [p for p in paths if p[0] == HEAD_KEY]
        elif rule.action in ("lora", "dora"):
            modules = set(_adapter_modules(plan, i, base, num_blocks)) & adapted
            chosen = [p for p in paths if p[:-1] in modules]
        else:
            blocks = _rule_blocks(plan, i, num_blocks)
            chosen = [p for p in paths if _selects(rule, p, blocks)]
            if not chosen and not rule.optional:
                nothing_after = ("; this model has nothing after its last block (no final norm, LM head or pooler): "
                                 "drop the rule, or give it optional: true"
                                 if rule.kinds == ("output",) and rule.match is None and rule.blocks is None else "")
                raise PlanError(f"{plan.describe(i)} matches no parameter{nothing_after}; some real paths: "
                                f"{example_paths(paths)}")
        for p in chosen:
            if rule.action == "freeze" and p[-1] in STATE_LEAVES:
                pinned.add(p)
            elif p[-1] in STATE_LEAVES:
                pinned.discard(p)
            if rule.action == "freeze" or (rule.action in ("lora", "dora") and p[-1] not in ADAPTER_LEAVES):
                labels[p] = FROZEN
            else:
                labels[p] = natural_label(p)
    for p in paths:  # statistics follow their BatchNorm (updated where it trains), unless a freeze rule named them
        if p[-1] in STATE_LEAVES and p not in pinned and labels.get(p[:-1] + ("scale",), FROZEN) != FROZEN:
            labels[p] = STATE
    return labels



QUANTIZABLE = ("kernel", "embedding")  # the matrices a quantize option applies to


def resolve_quantize(plan: Plan, labels: dict[Path, str], num_blocks: int,
                     quantized: Iterable[Path] = (), matrices: Iterable[Path] | None = None) -> dict[Path, str]:
    """The format (``nf4``, ...) of each leaf that freeze rules with ``quantize`` select.

    ``labels``: :func:`resolve_labels`' result; ``quantized``: paths already stored quantized
    (a GGUF base); ``matrices``: the kernel and embedding leaves the quantized matmul reads
    (default: every one; a convolution's kernel is not among them). The last quantize rule
    selecting a matrix decides its format; plain freeze rules leave it. Raises
    :class:`PlanError` for a quantize rule that selects no matrix, and for a quantized leaf that
    the plan trains (naming the rule, or the loaded leaf).
    """
    paths = list(labels)
    quantized = set(quantized)
    formats: dict[Path, str] = {}
    owner: dict[Path, int] = {}
    for i, rule in enumerate(plan.rules):
        if rule.action != "freeze" or rule.quantize is None:
            continue
        blocks = _rule_blocks(plan, i, num_blocks)
        chosen = [p for p in paths if p[-1] in QUANTIZABLE and p[0] not in (HEAD_KEY, PROMPT_LEAF)
                  and (matrices is None or p in matrices) and _selects(rule, p, blocks)]
        if not chosen:
            raise PlanError(f"{plan.describe(i)} quantizes no matrix (it applies to kernel and embedding leaves); "
                            f"some real paths: {example_paths(paths)}")
        kept = [p for p in chosen if p in quantized]
        if kept:  # a GGUF base's own quantization is what the user asked to keep
            log.info("%s: %d of its %d matrices are loaded quantized (keep_quantized) and keep their own format",
                     plan.describe(i), len(kept), len(chosen))
        formats.update({p: rule.quantize for p in chosen if p not in quantized})
        owner.update({p: i for p in chosen})
    for p in formats:
        if labels[p] != FROZEN:
            raise PlanError(f"{plan.describe(owner[p])} quantizes {path_str(p)} as {formats[p]}, but a later rule "
                            "trains it; only frozen leaves can be quantized: narrow this rule's match/blocks/kinds "
                            "or move it after the rules that train")
    for p in quantized:
        if labels.get(p, FROZEN) != FROZEN:
            raise PlanError(f"{path_str(p)} is loaded quantized (a GGUF model with keep_quantized), so the plan "
                            "cannot train it; freeze it, or load the model with keep_quantized false")
    return formats

