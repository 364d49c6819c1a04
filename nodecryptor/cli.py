"""Command-line entry point: builds the parser from nodecryptor.commands and dispatches."""

from __future__ import annotations

import argparse
import importlib
import sys

from nodecryptor import __version__
from nodecryptor.commands import COMMANDS
from nodecryptor.core.errors import NodecryptorError, SettingsError

EPILOG = """examples:
  nodecryptor run --node-name "$NODE_NAME"                 run the agent (as the DaemonSet does)
  nodecryptor plan --kubeconfig kc --node-name w1 --json    what would be encrypted on w1
  nodecryptor status --json                                 what is installed on this node
  nodecryptor bpf dump                                      decode the pinned BPF maps
  nodecryptor explain --dst 10.244.2.7 --proto tcp --dport 80
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodecryptor",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Encrypt a Kubernetes node's traffic to remote nodes and pods through "
        "Cilium's WireGuard device, except the control-plane bootstrap flows.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"nodecryptor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".commands.{name.replace('-', '_')}", __package__).register(sub)
    return parser


def _long_options(parser: argparse.ArgumentParser) -> set[str]:
    names = set()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            names.update(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
    return names


def normalize_go_flags(argv: list[str], long_options: set[str]) -> list[str]:
    """Accept Go's single-dash spelling (-kubeconfig x, -noop-route=true) of long options, so
    manifests written for the seed keep working."""
    out = []
    for token in argv:
        name = token.split("=", 1)[0]
        if token.startswith("-") and not token.startswith("--") and "-" + name in long_options:
            token = "-" + token
        out.append(token)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = normalize_go_flags(list(sys.argv[1:] if argv is None else argv), _long_options(parser))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SettingsError as e:
        print(f"nodecryptor {args.command}: {e}", file=sys.stderr)
        return 2
    except NodecryptorError as e:
        print(f"nodecryptor {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
