"""The offline demo's Hub: the sandbox hub kept in a folder (so it survives a restart), with
the example models of user ``demo`` and the bot's own user ``mergebot``. Both tokens are made
once and kept in a file only its owner can read, never printed."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from service.sandbox_hub.seed import seed_examples
from service.sandbox_hub.server import SandboxHub, SandboxServer
from service.sandbox_hub.store import HubStore

BOT_USER = "mergebot"
DEMO_USER = "demo"
TOKENS_FILE = "tokens.json"


def demo_tokens(folder: Path) -> dict[str, str]:
    """User name → token, made on first use."""
    path = folder / TOKENS_FILE
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tokens = {user: f"hf_sandbox_{secrets.token_hex(12)}" for user in (BOT_USER, DEMO_USER)}
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(tokens, file)
    return json.loads(path.read_text())


def start_demo_hub(folder: Path, port: int) -> tuple[SandboxServer, dict[str, str]]:
    """Start the demo hub on 127.0.0.1:``port``; return it and its users' tokens."""
    tokens = demo_tokens(folder)
    store = HubStore(folder / "data")
    seed_examples(store, DEMO_USER)
    hub = SandboxHub(store, users={token: user for user, token in tokens.items()})
    return SandboxServer(hub, port=port).__enter__(), tokens
