"""Example models for the sandbox hub: a tiny Llama base and three fine-tunes, and a tiny
SD1.5 pipeline and two fine-tunes of it (diffusers layout), committed as a user would upload
them, so the offline demo has something to merge."""

from __future__ import annotations

import tempfile
from pathlib import Path

from merge_engine.example import make_family, save_tiny_tokenizer
from service.sandbox_hub.store import HubStore

EXAMPLE_REPOS = ("base", "math", "code", "chat")
DIFFUSION_REPOS = ("sd-base", "sd-dreamy", "sd-photo")


def example_repo_ids(owner: str) -> list[str]:
    """The ids of every example model ``owner`` gets: the Llama family, then the SD one."""
    return [f"{owner}/{name}" for name in EXAMPLE_REPOS + DIFFUSION_REPOS]


def seed_examples(store: HubStore, owner: str = "demo") -> list[str]:
    """Create ``owner/base`` and its fine-tunes ``math``, ``code``, ``chat``, and
    ``owner/sd-base`` and its fine-tunes, unless they exist; return their ids."""
    repo_ids = [f"{owner}/{name}" for name in EXAMPLE_REPOS]
    if not all(store.get("model", repo_id) for repo_id in repo_ids):
        with tempfile.TemporaryDirectory() as tmp:
            base, tuned = make_family(Path(tmp), "llama", finetunes=3)
            for folder in (base, *tuned):  # so merges with calibration data can tokenize
                save_tiny_tokenizer(folder)
            _upload(store, owner, repo_ids, [base, *tuned])
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
