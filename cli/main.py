"""`distill`: the command line. Each group of subcommands lives in its own module; this only dispatches.

`distill train` / `eval` / `tiny-model` run the engine on this machine (cli.engine); `distill serve`,
`api`, `worker` and `reaper` run the service (cli.service); `distill db` and `keys` manage it (cli.admin);
`distill jobs` and `files` use a running service through the Python SDK (cli.client).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from cli import admin, client, engine, service

    parser = argparse.ArgumentParser(prog="distill", description="Knowledge distillation for LLMs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    engine.register(commands)
    service.register(commands)
    admin.register(commands)
    client.register(commands)
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
