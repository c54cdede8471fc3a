"""The bot merging with data: a RegMean request whose calibration data is a Hub dataset, read
pinned with the requester's own token; a private dataset or a file on the server refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_weights
from huggingface_hub import HfApi, snapshot_download
from service_env import start_sandbox, start_serve

from merge_engine import load_recipe, merge, preflight
from merge_engine.example import make_family, save_tiny_tokenizer

pytestmark = pytest.mark.slow  # real processes: a server, a worker, the sandbox hub

ALICE, BOB, CAROL = "tok-alice", "tok-bob", "tok-carol"
ROWS = [{"text": f"{i} * {i} = {i * i}"} for i in range(20)]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("with-data")
    family = make_family(root / "models", "llama", finetunes=2, seed=5, scale=0.05)
    for folder in family[1]:
        save_tiny_tokenizer(folder)
    server = start_sandbox({"alice": family})
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    for token, repo, private in ((ALICE, "alice/squares", False), (CAROL, "carol/secret", True)):
        api = HfApi(endpoint=server.url, token=token)
        api.create_repo(repo, repo_type="dataset", private=private)
        api.upload_folder(repo_id=repo, repo_type="dataset", folder_path=data)
    server.root, server.family, server.data = root, family, data
    yield server
    server.__exit__()


def regmean(dataset: str) -> str:
    return f"""merge_method: regmean
models:
  - model: alice/math
  - model: alice/code
calibration: {{dataset: {dataset}, samples: 8}}
"""


def test_a_regmean_request_reads_its_hub_dataset_pinned_and_documents_it(hub, tmp_path):
    process, bot = start_serve(hub.url, tmp_path / "work")
    try:
        # a private dataset of someone else, a file on the server: refused before any job
        status, body = bot.submit(regmean("carol/secret"), "bob/merged", BOB)
        assert status == 400 and "carol/secret" in body["error"], body
        local = regmean("alice/squares").replace(
            "dataset: alice/squares", f"path: {hub.data / 'train.jsonl'}"
        )
        status, body = bot.submit(local, "alice/local", ALICE)
        assert status == 400 and "cannot be read here" in body["error"], body
        assert body["field"] == "calibration.path"

        status, job = bot.submit(regmean("alice/squares"), "alice/regmean", ALICE)
        assert status == 202, job
        done = bot.wait_done(job["id"])
        assert done["status"] == "succeeded", done
    finally:
        process.stop()

    sha = HfApi(endpoint=hub.url, token=ALICE).dataset_info("alice/squares").sha
    published = Path(snapshot_download("alice/regmean", token=ALICE, endpoint=hub.url))
    card = (published / "README.md").read_text()
    assert f"@ `{sha}`, file `train.jsonl`" in card and "| 8 | `gram` |" in card
    assert "datasets:\n- alice/squares" in card
    # the dataset and the sources link to the Hub they came from
    assert f"[alice/squares]({hub.url}/datasets/alice/squares)" in card
    assert "huggingface.co" not in card
    assert f"alice/squares@{sha}" in (published / "mergebot_recipe.yaml").read_text()
    # the same merge on this machine, from the local copies of the models and the data
    _, (math, code) = hub.family
    recipe = load_recipe(
        regmean("x/y")
        .replace("alice/math", str(math))
        .replace("alice/code", str(code))
        .replace("dataset: x/y", f"path: {hub.data / 'train.jsonl'}")
        + "\n"
    )
    local = merge(
        preflight(recipe), tmp_path / "local", stats_dir=tmp_path / "s", show_progress=False
    )
    ours, theirs = load_weights(local), load_weights(published)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
