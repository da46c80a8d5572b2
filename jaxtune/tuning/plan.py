"""The trainability plan: an ordered list of rules over parameter paths, as Python or plain data.

A rule has an ``action`` and, for the path-based actions, selectors:

==========  =========================================================================
action      effect on the leaves it selects
==========  =========================================================================
``train``   trainable (label ``train``; adapter/head/prompt leaves keep their group)
``freeze``  frozen (label ``freeze``)
``lora``    a LoRA adapter on each selected linear; its base ``kernel``/``bias`` frozen
``dora``    the same with DoRA's magnitude vector
``prompt``  ``n_tokens`` trainable virtual-token embeddings prepended to the input
``head``    a fresh classification/regression head on top of the body
==========  =========================================================================

Selectors (all optional, combined with AND; a rule without any selects every leaf):
``match`` a regex searched in the leaf path ``layers_0/mlp/up_proj/kernel`` or its module path
``layers_0/mlp/up_proj``; ``blocks`` transformer block indices (``3``, ``[0, 1]``, ``"first:2"``,
``"last:4"``, ``"2:5"`` as a half-open range); ``kinds`` module kinds (see :data:`MODULE_KINDS`);
``targets`` (lora/dora only) module names as PEFT writes them (``["q_proj", "v_proj"]``) or
``"all-linear"`` (every linear except the output layer and heads, as PEFT defines it).

A ``train`` or ``freeze`` rule that selects no parameter is an error (a typo in ``match`` would
otherwise train nothing), unless it says ``optional: true``: then it is skipped. The
:func:`freeze_all_but` preset sets it on its rule for what follows the last block, which
DistilBERT, DeBERTa and classifier bodies without a pooler (RoBERTa's) do not have.

A ``freeze`` rule may also ``quantize`` the matrices it selects (``kernel`` and ``embedding``
leaves; vectors stay in the frozen dtype): ``int8``, ``fp8``, ``nf4`` or ``nf4_dq`` (see
:mod:`jaxtune.models.quant`). QLoRA is ``[{"action": "freeze", "quantize": "nf4"}, {"preset":
"lora"}]``: the lora rule freezes its base kernels again, so they stay quantized. A quantized
leaf that a later rule trains is an error naming the rule.

Every leaf starts frozen and rules apply in order, so later rules override earlier ones. A rule
is plain YAML-able data, e.g. ``{"match": "layers_(\\\\d+)/self_attn/(q|v)_proj", "action": "lora",
"rank": 8, "alpha": 16}``; :meth:`Plan.from_data` and :meth:`Plan.to_data` convert, and the
presets (:func:`full`, :func:`freeze_all_but`, :func:`lora`, :func:`prompt_tuning`, :func:`head`,
...) return plans that compose with ``+``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from jaxtune.models.quant import QUANTIZE
from jaxtune.schema import ConfigError, coerce, type_hints

ACTIONS = ("train", "freeze", "lora", "dora", "prompt", "head")
# Module kinds a rule can select (see jaxtune.tuning.labels.leaf_kinds for how paths map to them).
MODULE_KINDS = ("embeddings", "norms", "attention", "mlp", "output", "pooler", "head", "prompt")
HEAD_TASKS = ("classification", "regression")
HEAD_POOLING = ("mean", "cls", "last", "pooler", "cls_mean")
PROMPT_INIT = ("vocab", "text")

_SELECTORS = ("match", "blocks", "kinds")
_ADAPTER_OPTIONS = ("targets", "rank", "alpha", "dropout", "rslora")
_OPTIONS: dict[str, tuple[str, ...]] = {
    "train": _SELECTORS + ("optional",),
    "freeze": _SELECTORS + ("quantize", "optional"),
    "lora": _SELECTORS + _ADAPTER_OPTIONS,
    "dora": _SELECTORS + _ADAPTER_OPTIONS,
    "prompt": ("n_tokens", "init", "text"),
    "head": ("task", "num_labels", "pooling", "hidden", "extra_blocks", "dropout", "bias"),
}
_BLOCKS_RE = re.compile(r"^(first|last):(\d+)$|^(-?\d+):(-?\d+)$")


class PlanError(ValueError):
    """A plan is invalid, or does not fit the model; the message names the rule and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One plan rule. Fields that do not belong to ``action`` must stay None (checked).

    Adapter options: ``rank`` (default 8), ``alpha`` (default = rank), ``dropout`` on the adapter
    input (default 0; one value per model), ``rslora`` (scale alpha/sqrt(rank) instead of
    alpha/rank). Prompt options: ``n_tokens``, ``init`` (``vocab``: rows of random vocabulary
    embeddings, ``text``: embeddings of ``text`` tokenized, repeated to length). Head options:
    ``task``, ``num_labels`` (default 2; regression 1), ``pooling`` (default ``last`` for decoders,
    ``pooler`` for encoders with a pooler, ``cls_mean`` for DINOv2: the first token ++ the mean of the
    others), ``hidden`` widths of extra GELU layers, ``extra_blocks`` fresh transformer blocks before
    pooling (Llama's causal block on a decoder, BERT's on an encoder or image model), ``dropout`` before
    each head layer, ``bias`` of the output layer (default: as the family's HF classifier). ``optional``
    (train/freeze only): selecting no parameter skips the rule instead of failing.
    """

    action: str
    match: str | None = None
    blocks: str | int | tuple[int, ...] | None = None
    kinds: tuple[str, ...] | None = None
    targets: str | tuple[str, ...] | None = None
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    rslora: bool | None = None
    n_tokens: int | None = None
    init: str | None = None
    text: str | None = None
    task: str | None = None
    num_labels: int | None = None
    pooling: str | None = None
    hidden: tuple[int, ...] | None = None
    extra_blocks: int | None = None
    bias: bool | None = None
    quantize: str | None = None
    optional: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.kinds, str):
            object.__setattr__(self, "kinds", (self.kinds,))
        problem = self._problem()
        if problem:
            raise PlanError(f"rule {self.describe()}: {problem}")

    # ------------------------------------------------------------------ validation

    def _problem(self) -> str | None:
        """What is wrong with this rule on its own, or None."""
        if self.action not in ACTIONS:
            return f"unknown action {self.action!r}; choose one of {', '.join(ACTIONS)}"
        allowed = _OPTIONS[self.action]
        extra = [f.name for f in dataclasses.fields(self)
                 if f.name != "action" and getattr(self, f.name) is not None and f.name not in allowed]
        if extra:
            return (f"option(s) {', '.join(extra)} do not apply to action {self.action!r} "
                    f"(its options: {', '.join(allowed)})")
        wrong_type = self._check_types()
        if wrong_type:
            return wrong_type
        if self.match is not None:
            try:
                re.compile(self.match)
            except re.error as err:
                return f"match {self.match!r} is not a valid regular expression ({err})"
        if self.blocks is not None and not _valid_blocks(self.blocks):
            return (f"blocks {self.blocks!r} is not a block selection; use an index, a list of indices, "
                    "'first:N', 'last:N' or 'A:B'")
        if self.kinds is not None:
            bad = [k for k in self.kinds if k not in MODULE_KINDS]
            if bad or not self.kinds:
                return f"unknown kind(s) {bad or '[]'}; choose from {', '.join(MODULE_KINDS)}"
        return self._action_problem()

    def _check_types(self) -> str | None:
        """The first option whose value is not of its field's type, checked as a recipe's values
        are (:mod:`jaxtune.schema`), or None; keeps the normalised values (YAML's lists as tuples,
        so that rules stay hashable and compare by value; ints as floats). Without it
        ``lora(match=5)`` failed inside ``re``."""
        hints = type_hints(Rule)
        for f in dataclasses.fields(self):
            try:
                object.__setattr__(self, f.name, coerce(getattr(self, f.name), hints[f.name], f.name))
            except ConfigError as err:
                return str(err)
        return None

    def _action_problem(self) -> str | None:
        if self.quantize is not None and self.quantize not in QUANTIZE:
            return f"quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}"
        if self.action in ("lora", "dora"):
            if self.rank is not None and self.rank <= 0:
                return f"rank must be a positive integer, got {self.rank!r}"
            if self.alpha is not None and self.alpha <= 0:
                return f"alpha must be a positive number, got {self.alpha!r}"
            targets = self.targets
            if targets is not None and (targets == () or isinstance(targets, str) and targets != "all-linear"):
                return f"targets must be 'all-linear' or a non-empty list of module names, got {self.targets!r}"
        if self.dropout is not None and not 0 <= self.dropout < 1:
            return f"dropout must be in [0, 1), got {self.dropout!r}"
        if self.action == "prompt":
            if self.n_tokens is None or self.n_tokens <= 0:
                return f"n_tokens must be a positive integer, got {self.n_tokens!r}"
            if self.init is not None and self.init not in PROMPT_INIT:
                return f"init must be one of {', '.join(PROMPT_INIT)}, got {self.init!r}"
            if (self.init == "text") != (self.text is not None):
                return "init 'text' needs the option text (and text needs init 'text')"
        if self.action == "head":
            return self._head_problem()
        return None

    def _head_problem(self) -> str | None:
        if self.task not in HEAD_TASKS:
            return f"task must be one of {', '.join(HEAD_TASKS)}, got {self.task!r}"
        if self.num_labels is not None:
            least = 2 if self.task == "classification" else 1
            if self.num_labels < least:
                return f"num_labels must be an integer >= {least} for {self.task}, got {self.num_labels!r}"
        if self.pooling is not None and self.pooling not in HEAD_POOLING:
            return f"pooling must be one of {', '.join(HEAD_POOLING)}, got {self.pooling!r}"
        if self.hidden is not None and not all(w > 0 for w in self.hidden):
            return f"hidden must be a list of positive widths, got {self.hidden!r}"
        if self.extra_blocks is not None and self.extra_blocks < 0:
            return f"extra_blocks must be a non-negative integer, got {self.extra_blocks!r}"
        return None

    # ------------------------------------------------------------------ data

    def to_data(self) -> dict[str, Any]:
        """Plain data (str/int/float/bool/list) with only the fields that are set."""
        out: dict[str, Any] = {"action": self.action}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "action" and value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Rule:
        if not isinstance(data, Mapping):
            raise PlanError(f"rule {data!r}: a rule is a mapping such as {{'action': 'train', 'match': 'norm'}}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"rule {dict(data)!r}: unknown option(s) {', '.join(unknown)}; "
                            f"known options: {', '.join(sorted(known))}")
        if "action" not in data:
            raise PlanError(f"rule {dict(data)!r}: missing 'action' (one of {', '.join(ACTIONS)})")
        return cls(**data)

    def describe(self) -> str:
        """The rule as compact data, for error messages."""
        return str(self.to_data())


@dataclasses.dataclass(frozen=True)
class Plan:
    """An ordered tuple of :class:`Rule`; ``plan_a + plan_b`` appends (later rules win)."""

    rules: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))

    def __add__(self, other: Plan) -> Plan:
        return Plan(self.rules + as_plan(other).rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def to_data(self) -> list[dict[str, Any]]:
        return [rule.to_data() for rule in self.rules]

    @classmethod
    def from_data(cls, data: str | Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> Plan:
        """A plan from plain data, as a recipe's ``plan:`` writes it: a preset name (``full``), or a
        list of rule dicts (``{"action": "lora", ...}``) and preset dicts (``{"preset": "lora",
        "rank": 8}``), or ``{"rules": [...]}``. Errors name the item's index."""
        if isinstance(data, str):
            return _preset({"preset": data}, "plan")
        if isinstance(data, Mapping):
            if set(data) != {"rules"}:
                raise PlanError(f"plan: expected a list of rules or {{'rules': [...]}}, got keys {sorted(data)}")
            data = data["rules"]
        if isinstance(data, bytes) or not isinstance(data, Sequence):
            raise PlanError(f"plan: expected a list of rules, got {type(data).__name__}")
        if not data:
            raise PlanError("plan: empty; give rules or a preset (e.g. plan: full)")
        plan = cls()
        for i, item in enumerate(data):
            if isinstance(item, Mapping) and "preset" in item:
                plan = plan + _preset(item, f"plan rule #{i}")
                continue
            try:
                plan = plan + Plan((Rule.from_data(item),))
            except PlanError as err:
                raise PlanError(f"plan rule #{i} {err.args[0].removeprefix('rule ')}") from None
        return plan

    def describe(self, index: int) -> str:
        return f"plan rule #{index} {self.rules[index].describe()}"


def as_plan(plan: Plan | Rule | Sequence[Plan | Rule] | Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> Plan:
    """Accept a :class:`Plan`, a rule, a list of plans and rules (appended in order, as ``+`` does:
    a list of rules or rule dicts is a plan too), or plain data."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Rule):
        return Plan((plan,))
    if isinstance(plan, Sequence) and not isinstance(plan, (str, bytes)) and all(
            isinstance(r, Plan | Rule) for r in plan):
        return Plan(tuple(rule for item in plan for rule in as_plan(item).rules))
    return Plan.from_data(plan)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- presets


def full() -> Plan:
    """Train every parameter."""
    return Plan((Rule("train"),))


def train(match: str | None = None, *, blocks: Any = None, kinds: Sequence[str] | None = None) -> Plan:
    """Train the selected leaves (on top of whatever came before)."""
    return Plan((Rule("train", match=match, blocks=blocks, kinds=kinds),))


def freeze(match: str | None = None, *, blocks: Any = None, kinds: Sequence[str] | None = None,
           quantize: str | None = None) -> Plan:
    """Freeze the selected leaves (on top of whatever came before); with ``quantize`` (``int8``,
    ``fp8``, ``nf4``, ``nf4_dq``) their matrices are stored quantized: ``freeze(quantize="nf4") +
    lora(8)`` is QLoRA."""
    return Plan((Rule("freeze", match=match, blocks=blocks, kinds=kinds, quantize=quantize),))


def freeze_all_but(last_n_blocks: int = 0, *, kinds: str | Sequence[str] = (), train_output: bool = True) -> Plan:
    """Layer-wise partial fine-tuning: the blocks closest to the input stay frozen.

    Trains the last ``last_n_blocks`` transformer blocks, the modules of ``kinds`` (e.g.
    ``"norms"``) anywhere, and with ``train_output`` what follows the last block (final norm and
    LM head of a decoder, pooler of an encoder; a model with nothing there, such as DistilBERT, just
    trains its blocks: that rule is ``optional``). Every leaf starts frozen, so the plan needs no
    blanket ``freeze`` rule, and it composes with prompts and heads in any order. With adapters,
    rules apply in order as always: a ``lora`` rule after it freezes the base weights of the
    modules it adapts in those blocks (an adapter-only plan, exportable as PEFT); before it, those
    base weights train beside their adapters (exportable merged).
    """
    if not isinstance(last_n_blocks, int) or last_n_blocks < 0:
        raise PlanError(f"freeze_all_but: last_n_blocks must be a non-negative integer, got {last_n_blocks!r}")
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    rules = []
    if last_n_blocks:
        rules.append(Rule("train", blocks=f"last:{last_n_blocks}"))
    if kinds:
        rules.append(Rule("train", kinds=tuple(kinds)))
    if train_output:
        rules.append(Rule("train", kinds=("output",), optional=True))
    return Plan(tuple(rules))


def lora(
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: str | Sequence[str] | None = None,
    *,
    rslora: bool = False,
    dora: bool = False,
    match: str | None = None,
    blocks: Any = None,
    kinds: Sequence[str] | None = None,
) -> Plan:
    """LoRA (or DoRA with ``dora=True``) on the linears selected by ``targets``, ``match``,
    ``blocks`` and ``kinds``; ``targets`` defaults to ``"all-linear"`` unless ``match`` is given,
    and ``alpha`` to ``rank`` (scale 1)."""
    return Plan((Rule("dora" if dora else "lora", match=match, blocks=blocks, kinds=kinds,
                      targets=targets if targets is None or isinstance(targets, str) else tuple(targets),
                      rank=rank, alpha=rank if alpha is None else alpha, dropout=dropout, rslora=rslora),))


def dora(rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
         targets: str | Sequence[str] | None = None, **kwargs: Any) -> Plan:
    """DoRA (weight-decomposed LoRA); same options as :func:`lora`."""
    return lora(rank, alpha, dropout, targets, dora=True, **kwargs)


def prompt_tuning(n_tokens: int, init: str = "vocab", text: str | None = None) -> Plan:
    """``n_tokens`` trainable virtual tokens before the input; the base stays frozen."""
    return Plan((Rule("prompt", n_tokens=n_tokens, init=init, text=text),))


def head(
    task: str = "classification",
    num_labels: int | None = None,
    *,
    pooling: str | None = None,
    hidden: int | Sequence[int] = (),
    extra_blocks: int = 0,
    dropout: float | None = None,
    bias: bool | None = None,
) -> Plan:
    """A fresh classification or regression head on the body (see :class:`Rule` for defaults)."""
    hidden = (hidden,) if isinstance(hidden, int) else hidden
    return Plan((Rule("head", task=task, num_labels=num_labels, pooling=pooling, hidden=tuple(hidden) or None,
                      extra_blocks=extra_blocks or None, dropout=dropout, bias=bias),))


PRESETS = ("full", "lora", "dora", "prompt_tuning", "head", "freeze_all_but", "train", "freeze")


def _preset(item: Mapping[str, Any], where: str) -> Plan:
    """A preset written as data, ``{"preset": "lora", "rank": 8}``; errors name ``where`` and the option."""
    item = dict(item)
    if "action" in item:
        raise PlanError(f"{where}: give either 'action' (a rule) or 'preset', not both")
    name = item.pop("preset")
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=1)
        raise PlanError(f"{where}.preset: expected one of {', '.join(PRESETS)}, got {name!r}"
                        + (f"; did you mean {close[0]!r}?" if close else ""))
    fn = globals()[name]
    options = [p for p in inspect.signature(fn).parameters if p != "kwargs"]
    unknown = [k for k in item if k not in options]
    if unknown:
        close = difflib.get_close_matches(unknown[0], options, n=1)
        raise PlanError(f"{where}: preset {name!r} has no option {unknown[0]!r} "
                        f"(options: {', '.join(options) or 'none'})"
                        + (f"; did you mean {close[0]!r}?" if close else ""))
    try:
        return fn(**{k: list(v) if isinstance(v, tuple) else v for k, v in item.items()})
    except (PlanError, ValueError, TypeError) as err:
        raise PlanError(f"{where} (preset {name}): {str(err).removeprefix('rule ')}") from None


# ----------------------------------------------------------------------------- helpers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _valid_blocks(blocks: Any) -> bool:
    if _is_int(blocks):
        return True
    if isinstance(blocks, str):
        return bool(_BLOCKS_RE.match(blocks.strip()))
    return isinstance(blocks, tuple) and len(blocks) > 0 and all(_is_int(b) for b in blocks)


def block_indices(blocks: str | int | tuple[int, ...], num_blocks: int) -> list[int]:
    """Resolve a ``blocks`` selector against a model with ``num_blocks`` blocks.

    Raises :class:`PlanError` (without the rule's name; the caller adds it) when out of range.
    """
    if _is_int(blocks):
        wanted = [blocks]
    elif isinstance(blocks, tuple):
        wanted = list(blocks)
    else:
        m = _BLOCKS_RE.match(blocks.strip())
        if m.group(1):
            n = int(m.group(2))
            if n > num_blocks:
                raise PlanError(f"blocks {blocks!r}: the model has only {num_blocks} blocks")
            return list(range(num_blocks))[:n] if m.group(1) == "first" else list(range(num_blocks - n, num_blocks))
        start, stop = int(m.group(3)), int(m.group(4))
        if max(start, stop) > num_blocks:  # a slice would clamp it silently
            raise PlanError(f"blocks {blocks!r}: the model has only {num_blocks} blocks (0:{num_blocks} is all)")
        wanted = list(range(num_blocks))[start:stop]
        if not wanted:
            raise PlanError(f"blocks {blocks!r} selects no block of {num_blocks}")
        return wanted
    bad = [b for b in wanted if not -num_blocks <= b < num_blocks]
    if bad:
        raise PlanError(f"blocks {blocks!r}: index {bad[0]} is out of range for {num_blocks} blocks")
    return sorted({b % num_blocks for b in wanted})
