"""`pdserve` command line: wiring only. Each subcommand lives next to what it drives.

  serve     start the pools and the OpenAI-compatible router        (pdserve.serve)
  demo      start the default local system, chat with it, benchmark  (pdserve.demo)
  plan      search the placement that maximises per-GPU goodput     (pdserve.placement.cli)
  simulate  run a serving config through the simulator              (pdserve.placement.cli)
  profile   measure the engine on this hardware, fit a latency model (pdserve.placement.cli)
  bench     replay a workload against any OpenAI endpoint           (pdserve.bench.cli)
  chaos     inject KV-transfer faults, check the invariants per cell (pdserve.chaos_cli)
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes `add_parsers(subparsers)`, which registers its commands with `func` set.
_COMMAND_MODULES = ("pdserve.serve", "pdserve.demo", "pdserve.placement.cli", "pdserve.bench.cli", "pdserve.chaos_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ValueError as e:  # config and input errors: one clear line, no traceback
        print(f"pdserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
