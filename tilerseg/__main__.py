"""``python -m tilerseg``: the command line."""

from .cli import run

run()
