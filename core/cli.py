"""`distill`: the command line. Each subcommand lives with the code it drives; this only dispatches.

`distill train` / `distill eval` run the engine locally (core.distill.cli). `distill serve`, `api`,
`worker`, `reaper`, `db` and `keys` run and manage the service (core.jobs.cli); the service's processes
are started by module name, so core never imports api/ or worker/.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from core.distill import cli as engine_cli
    from core.jobs import cli as service_cli

    parser = argparse.ArgumentParser(prog="distill", description="Knowledge distillation for LLMs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    engine_cli.register(commands)
    service_cli.register(commands)
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
