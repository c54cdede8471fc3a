"""The ``mergebot`` command: the engine's commands plus the service's (``sandbox-hub`` so far)."""

from __future__ import annotations

import argparse
import contextlib
import secrets
import sys
from pathlib import Path

from merge_engine.cli import build_parser
from merge_engine.cli import main as engine_main


def cmd_sandbox_hub(args: argparse.Namespace) -> None:
    from service.sandbox_hub import HubStore, SandboxHub, SandboxServer
    from service.sandbox_hub.seed import seed_examples

    store = HubStore(Path(args.data) if args.data else None)
    token = args.token or f"hf_sandbox_{secrets.token_hex(8)}"
    hub = SandboxHub(store, users={token: args.user})
    seeded = seed_examples(store, args.user) if args.seed else []
    with SandboxServer(hub, port=args.port) as server:
        print(f"sandbox hub on {server.url}; user {args.user}", flush=True)
        if not args.token:  # a throwaway credential of this local server, not of any real account
            print(f"use it with: HF_ENDPOINT={server.url} HF_TOKEN={token}", flush=True)
        if seeded:
            print("example models: " + ", ".join(seeded), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.thread.join()


def add_service_commands(sub: argparse._SubParsersAction) -> None:
    hub = sub.add_parser(
        "sandbox-hub", help="run a Hub-compatible server on 127.0.0.1 (tests and the offline demo)"
    )
    hub.add_argument("--port", type=int, default=7861, help="0 picks a free port")
    hub.add_argument("--data", help="folder that keeps repos across restarts (default: in memory)")
    hub.add_argument(
        "--seed", action="store_true", help="add a tiny example base model and two fine-tunes"
    )
    hub.add_argument(
        "--user", default="demo", help="the user that owns the example models and the token"
    )
    hub.add_argument("--token", help="the user's token (default: a random one, printed)")
    hub.set_defaults(func=cmd_sandbox_hub)


def main(argv: list[str] | None = None) -> int:
    return engine_main(argv, build_parser(add_service_commands))


if __name__ == "__main__":
    sys.exit(main())
