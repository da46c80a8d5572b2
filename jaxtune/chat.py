"""The glue behind ``jaxtune generate``: load a model or a run directory, then prompt or chat."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxtune.config import ConfigError
from jaxtune.run import (CONFIG_FILE, Data, Log, _print, load_run_config, load_tokenizer, load_tuned,
                         make_trainer, model_dir, restore_trained, setup_runtime)

Loaded = tuple[Any, Any, Any, Path]  # (module, params, tokenizer, model_dir)


def load_for_generation(model: str, *, best: bool = False, log: Log = _print) -> Loaded:
    """``(module, params, tokenizer, model_dir)`` of a model path/name or a run directory."""
    from jaxtune import tuning
    from jaxtune.models import hf

    if Path(model, CONFIG_FILE).is_file():
        config = load_run_config(model)
        setup_runtime(config)
        directory = model_dir(config.model.path)
        tokenizer = load_tokenizer(config, directory)
        tuned = load_tuned(config, directory, None, tokenizer)
        if tuned.task != "lm":
            raise ConfigError(f"{model}: this run trained a {tuned.task} head; generate needs a language model")
        trainer = make_trainer(config, tuned, Data("chat", None, None), Path(model), 1)
        step = restore_trained(trainer, best=best)
        log(f"{model}: step {step}" if step is not None else f"{model}: no checkpoint yet, using the base model")
        return tuned.module, tuning.combine(trainer.trainable, trainer.frozen), tokenizer, directory
    directory = model_dir(model)
    from transformers import AutoTokenizer

    pretrained = hf.load_pretrained(directory)
    return pretrained.module, pretrained.params, AutoTokenizer.from_pretrained(str(directory)), directory


def _stop_ids(tokenizer: Any, directory: Path, stop: Sequence[str]) -> tuple[int, ...]:
    """EOS (tokenizer and generation_config.json) plus ``stop``: tokens or token ids."""
    from jaxtune.models.generate import default_stop_token_ids

    ids = list(default_stop_token_ids(tokenizer, directory))
    for token in stop:
        if token.lstrip("-").isdigit():
            ids.append(int(token))
            continue
        found = tokenizer.convert_tokens_to_ids(token)
        if found is None or found == tokenizer.unk_token_id:
            encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
            if len(encoded) != 1:
                raise ConfigError(f"--stop {token!r}: not a single token of this tokenizer (it encodes to "
                                  f"{encoded}); give a token or a token id")
            found = encoded[0]
        ids.append(int(found))
    return tuple(dict.fromkeys(ids))


def _complete(loaded: Loaded, items: Sequence[Any], *, chat: bool, stop: Sequence[str] = (),
              **options: Any) -> list[list[int]]:
    """New token ids for each prompt or conversation in ``items`` (stop token excluded)."""
    from jaxtune.models.generate import encode_prompts, generate

    module, params, tokenizer, directory = loaded
    stop_ids = _stop_ids(tokenizer, directory, stop)
    try:
        prompt_ids = encode_prompts(tokenizer, list(items), chat=chat)
    except ValueError as err:
        raise ConfigError(f"--chat: {err}") from None
    return generate(module, params, prompt_ids, stop_token_ids=stop_ids, **options)


def generate(model: str, prompts: Sequence[str], *, chat: bool = False, system: str | None = None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop: Sequence[str] = (), seed: int = 0, best: bool = False, log: Log = _print,
             loaded: Loaded | None = None) -> list[dict[str, Any]]:
    """Generate for each prompt (a chat user turn with ``chat``); returns
    ``[{"prompt", "text", "ids"}]`` (``ids``: the new token ids, without the stop token)."""
    loaded = loaded or load_for_generation(model, best=best, log=log)
    if chat:
        items = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
                 for p in prompts]
    else:
        items = list(prompts)
    new = _complete(loaded, items, chat=chat, stop=stop, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_k=top_k, top_p=top_p, seed=seed)
    tokenizer = loaded[2]
    return [{"prompt": p, "text": tokenizer.decode(ids, skip_special_tokens=True), "ids": ids}
            for p, ids in zip(prompts, new)]


def generate_chat(loaded: Loaded, messages: list[dict[str, str]], **options: Any) -> str:
    """The assistant's reply to a conversation (the last message is the user's)."""
    new = _complete(loaded, [messages], chat=True, **options)[0]
    return loaded[2].decode(new, skip_special_tokens=True)
