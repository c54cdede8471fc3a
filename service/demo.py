"""The offline demo's Hub: the sandbox hub kept in a folder (so it survives a restart), with
the example models of user ``demo`` and the bot's own user ``mergebot``. Both tokens are made
once and kept in a file only its owner can read, never printed.

The example models are a tiny Llama base, three fine-tunes and a LoRA adapter of the base
(``math-lora``: the math fine-tune extracted at rank 4, so ``demo/base+demo/math-lora`` is
close to ``demo/math``), and a tiny SD1.5 pipeline and two fine-tunes of it (diffusers
layout), made by the engine and committed into the hub's store
as a user would upload them, so the demo has something to merge. They are made here, on the
bot's side, because the sandbox hub is a Hub and knows nothing of the engine; the bot itself
reaches it only through ``HF_ENDPOINT``.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path

from merge_engine.example import make_family, save_tiny_tokenizer
from service.sandbox_hub import HubStore, SandboxHub, SandboxServer

BOT_USER = "mergebot"
DEMO_USER = "demo"
TOKENS_FILE = "tokens.json"
EXAMPLE_REPOS = ("base", "math", "code", "chat")
ADAPTER_REPOS = ("math-lora",)
DIFFUSION_REPOS = ("sd-base", "sd-dreamy", "sd-photo")


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


def example_repo_ids(owner: str) -> list[str]:
    """The ids of every example model ``owner`` gets: the Llama family, then the SD one."""
    return [f"{owner}/{name}" for name in EXAMPLE_REPOS + ADAPTER_REPOS + DIFFUSION_REPOS]


def seed_examples(store: HubStore, owner: str = "demo") -> list[str]:
    """Create ``owner/base`` and its fine-tunes ``math``, ``code``, ``chat``, and
    ``owner/sd-base`` and its fine-tunes, unless they exist; return their ids."""
    repo_ids = [f"{owner}/{name}" for name in EXAMPLE_REPOS + ADAPTER_REPOS]
    if not all(store.get("model", repo_id) for repo_id in repo_ids):
        from merge_engine.extract import extract_lora, plan_extraction

        with tempfile.TemporaryDirectory() as tmp:
            base, tuned = make_family(Path(tmp), "llama", finetunes=3)
            for folder in (base, *tuned):  # so merges with calibration data can tokenize
                save_tiny_tokenizer(folder)
            adapter = Path(tmp) / "math-lora"
            extract_lora(plan_extraction(tuned[0], base, rank=4), adapter, show_progress=False)
            _upload(store, owner, repo_ids, [base, *tuned, adapter])
    diffusion_ids = [f"{owner}/{name}" for name in DIFFUSION_REPOS]
    if not all(store.get("model", repo_id) for repo_id in diffusion_ids):
        from merge_engine.example_diffusion import make_finetune, make_pipeline

        with tempfile.TemporaryDirectory() as tmp:
            base = make_pipeline(Path(tmp) / "base", "sd1", seed=0)
            tuned = [make_finetune(base, Path(tmp) / f"t{i}", seed=i, noise=0.05) for i in (1, 2)]
            _upload(store, owner, diffusion_ids, [base, *tuned])
    return example_repo_ids(owner)


def _upload(store: HubStore, owner: str, repo_ids: list[str], folders: list[Path]) -> None:
    for repo_id, folder in zip(repo_ids, folders, strict=True):
        repo, _ = store.create("model", repo_id, owner, private=False)
        files = {
            str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        store.commit(repo, "main", None, files, [], "Upload example model", "", owner)
