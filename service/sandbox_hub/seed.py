"""Example models for the sandbox hub: a tiny Llama base and three fine-tunes, committed as
a user would upload them, so the offline demo has something to merge."""

from __future__ import annotations

import tempfile
from pathlib import Path

from merge_engine.example import make_family, save_tiny_tokenizer
from service.sandbox_hub.store import HubStore

EXAMPLE_REPOS = ("base", "math", "code", "chat")


def seed_examples(store: HubStore, owner: str = "demo") -> list[str]:
    """Create ``owner/base`` and its fine-tunes ``math``, ``code``, ``chat`` unless they exist;
    return their ids."""
    repo_ids = [f"{owner}/{name}" for name in EXAMPLE_REPOS]
    if all(store.get("model", repo_id) for repo_id in repo_ids):
        return repo_ids
    with tempfile.TemporaryDirectory() as tmp:
        base, tuned = make_family(Path(tmp), "llama", finetunes=3)
        for folder in (base, *tuned):  # so merges with calibration data can tokenize
            save_tiny_tokenizer(folder)
        for repo_id, folder in zip(repo_ids, [base, *tuned], strict=True):
            repo, _ = store.create("model", repo_id, owner, private=False)
            files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
            store.commit(repo, "main", None, files, [], "Upload example model", "", owner)
    return repo_ids
