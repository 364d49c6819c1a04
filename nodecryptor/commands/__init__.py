"""CLI sub-commands, one module each. Every module exposes ``register(subparsers)``, which adds
its parser and sets ``func`` to a handler ``(args) -> int``. Handlers translate flags into
library calls and print; they hold no logic of their own.

Add a command by creating its module and naming it here.
"""

COMMANDS = (
    "run",
    "plan",
    "status",
    "explain",
    "cleanup",
    "bpf",
)
