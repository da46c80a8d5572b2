"""``python -m jaxtune ...`` is the ``jaxtune`` command."""

from jaxtune.cli import run

run()
