"""`pdserve` command line: wiring only. Each subcommand lives next to what it drives.

  serve     start the pools and the OpenAI-compatible router        (pdserve.serve)
  demo      start the default local system, chat with it, benchmark  (pdserve.demo)
  plan      search the placement that maximises per-GPU goodput     (pdserve.placement.cli)
  simulate  run a serving config through the simulator              (pdserve.placement.cli)
  profile   measure the engine on this hardware, fit a latency model (pdserve.placement.cli)
  bench     replay a workload against any OpenAI endpoint           (pdserve.bench.cli)
  chaos     inject KV-transfer faults, check the invariants per cell (pdserve.chaos_cli)

Parsing is stdlib argparse (no extra dependency, and every subcommand module already speaks it);
`main` turns the errors a user can cause (bad input, missing files, no cluster) into one line.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from pdserve import __version__, chaos_cli, demo, serve
from pdserve.bench import cli as bench_cli
from pdserve.placement import cli as placement_cli

# Each module exposes `add_parsers(subparsers)`, which registers its commands with `func` set.
COMMAND_MODULES: tuple[ModuleType, ...] = (serve, demo, placement_cli, bench_cli, chaos_cli)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps hand-wrapped descriptions and appends each flag's default unless the help already
    says it (or there is none to say: None, False, a required flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == argparse.SUPPRESS
                or action.required
                or not action.option_strings or isinstance(action, argparse._VersionAction)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"pdserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_parsers(sub)
    for p in all_parsers(parser):
        p.formatter_class = HelpFormatter
    return parser


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """`parser` and every subcommand parser below it, depth first."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                found += all_parsers(child)
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM turned into one by pdserve.serve
        return 128 + getattr(e, "signum", 2)
    except (ValueError, OSError) as e:  # bad input, a missing file, no cluster: one clear line
        print(f"pdserve {args.command}: error: {describe(e)}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    except Exception as e:
        if not type(e).__module__.startswith("ray"):
            raise  # a bug of ours: the traceback is what a report needs
        print(f"pdserve {args.command}: error: {describe(e)}", file=sys.stderr)
        return 1


def describe(e: BaseException) -> str:
    """One line for an error a user can cause; file errors name the file."""
    if isinstance(e, OSError) and e.filename is not None:
        name = str(e.filename)
        if isinstance(e, FileNotFoundError) and any(c in name for c in "*?["):
            return f"{name}: no file matches this pattern"
        return f"{name}: {e.strerror or type(e).__name__}"
    if isinstance(e, ConnectionError) and "Ray instance" in str(e):
        return ("no Ray cluster found at --address auto (start one with `ray up cluster.yaml` or `ray start "
                "--head`, or use --address local for an embedded one)")
    lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
    return lines[-1] if lines else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
