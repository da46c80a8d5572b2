"""The recipe commands the documentation shows load as shown: each ``jaxtune train|eval|plan-memory
configs/X.yaml KEY=VALUE ...`` in README.md, docs/ and ``jaxtune --help``, and each line of overrides
that a recipe's opening comment gives to paste (its GPU/TPU sizes, its variants), is a valid config,
and an error the docs print after a command is the error it gives. Running the recipes is
tests/test_recipes.py's job."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jaxtune import config
from jaxtune.cli import EXAMPLES
from jaxtune.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DOCS = {path.name: path.read_text() for path in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))}
DOCS["jaxtune --help"] = EXAMPLES
COMMAND = re.compile(r"jaxtune (?:train|eval|plan-memory) (configs/[\w.]+\.yaml)((?:[ \t]+[\w.]+=[^\s\"'`#]+)*)")
OVERRIDE = re.compile(r"(?<![\w.-])([a-z_]+(?:\.[a-z_0-9]+)+)=(\S+)")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(:\d+)?$")  # the reader's own value: HOST0:1234, N
PUNCTUATION = ",;.:)\""  # of the sentence or the quoted command a value ends
CONFIG_ERROR = "jaxtune: error: config error: "


def documented_commands() -> list[tuple[str, str, list[str], str | None]]:
    """``(doc, recipe, overrides, the config error the doc prints after it or None)`` per command."""
    found = []
    for doc, text in DOCS.items():
        lines = text.replace("\\\n", " ").splitlines()  # a shell line continued on the next
        for i, line in enumerate(lines):
            shown = lines[i + 1] if i + 1 < len(lines) else ""
            for match in COMMAND.finditer(line):
                error = shown.removeprefix(CONFIG_ERROR) if shown.startswith(CONFIG_ERROR) else None
                found.append((doc, match[1], match[2].split(), error))
    return found


def comment_overrides(recipe: Path) -> list[list[str]]:
    """The overrides each line of the recipe's opening comment gives (a line and the more indented
    lines that continue it), for the lines that give any; values that name the reader's own
    (``distributed.num_processes=N``) are left out."""
    groups: list[list[str]] = []
    for line in recipe.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:]
        if not (text.startswith("  ") and groups):
            groups.append([])
        values = [(key, value.rstrip(PUNCTUATION)) for key, value in OVERRIDE.findall(text)]
        groups[-1] += [f"{key}={value}" for key, value in values if not PLACEHOLDER.match(value)]
    return [group for group in groups if group]


COMMANDS = documented_commands()
RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def test_the_commands_and_comments_are_found():
    docs = {doc for doc, *_ in COMMANDS}
    assert {"README.md", "cli.md", "jaxtune --help"} <= docs
    assert ("jaxtune --help", "configs/quickstart.yaml",
            ["train.steps=8", "optimizer.learning_rate=3e-4", "output.dir=runs/try"], None) in COMMANDS
    assert ("cli.md", "configs/tpu_pod.yaml", ["model.dtype=bfloat16", "data.batch_size=256", "data.max_length=1024",
                                               "train.steps=2000", "output.dir=/mnt/shared/runs/pod"], None) in COMMANDS
    assert sum(error is not None for *_, error in COMMANDS) == 2  # cli.md's two config errors
    assert comment_overrides(CONFIGS / "chat_chatterbot.yaml") == [[
        "data.train_size=null", "data.validation_size=null", "train.epochs=3", "data.max_length=512",
        "data.batch_size=16", "model.dtype=bfloat16"]]
    assert ["distributed.initialize=auto"] in comment_overrides(CONFIGS / "tpu_pod.yaml")
    assert sum(bool(comment_overrides(CONFIGS / r)) for r in RECIPES) == len(RECIPES)  # every recipe gives sizes


@pytest.mark.parametrize("doc, recipe, overrides, error", COMMANDS,
                         ids=[f"{doc}: {recipe} {' '.join(o)}" for doc, recipe, o, _ in COMMANDS])
def test_a_documented_command_loads_as_shown(doc, recipe, overrides, error):
    if error is None:
        config.load(ROOT / recipe, overrides)
    else:
        with pytest.raises(ConfigError) as info:
            config.load(ROOT / recipe, overrides)
        assert str(info.value) == error


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_overrides_a_recipe_comment_gives_load(recipe):
    for overrides in comment_overrides(CONFIGS / recipe):
        config.load(CONFIGS / recipe, overrides)
