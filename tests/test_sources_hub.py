"""Hub references (``org/name@revision``) end to end: the real ``huggingface_hub`` client,
in a ``mergebot`` subprocess, against the sandbox hub on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import load_weights, two_model_ties, write_recipe
from huggingface_hub import HfApi

from service.sandbox_hub import HubStore, SandboxHub, SandboxServer

pytestmark = pytest.mark.slow  # each test starts mergebot in a subprocess

TOKEN = "hf_sandbox_alice"
RECIPE = """merge_method: ties
base_model: alice/base
models:
  - model: alice/math{pin}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: alice/code
    parameters: {{weight: 0.5, density: 0.5}}
"""


@pytest.fixture(scope="module")
def hub(llama_family):
    """The sandbox hub with alice's base and two fine-tunes (plus a file no merge needs)."""
    sandbox = SandboxHub(HubStore(), users={TOKEN: "alice"})
    with SandboxServer(sandbox) as server:
        api = HfApi(endpoint=server.url, token=TOKEN)
        base, (a, b, _) = llama_family
        shas = {}
        for name, folder in (("base", base), ("math", a), ("code", b)):
            api.create_repo(f"alice/{name}")
            shas[name] = api.upload_folder(repo_id=f"alice/{name}", folder_path=folder).oid
        api.upload_file(
            repo_id="alice/math", path_or_fileobj=b"\0" * 1000, path_in_repo="optimizer.pt"
        )
        shas["math"] = api.model_info("alice/math").sha
        server.shas = shas
        server.api = api
        yield server


def mergebot(
    server: SandboxServer, tmp_path: Path, *args: str, token: str | None = None
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "merge_engine.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_validate_reads_headers_only_and_reports_pinned_commits(hub, tmp_path):
    before = len(hub.hub.requests)
    run = mergebot(hub, tmp_path, "validate", str(write_recipe(tmp_path, RECIPE.format(pin=""))))
    assert run.returncode == 0, run.stderr
    for name in ("base", "math", "code"):
        assert f"alice/{name}: {hub.shas[name]}" in run.stdout
    weight_reads = [
        r
        for r in hub.hub.requests[before:]
        if r.method == "GET" and r.path.endswith(".safetensors")
    ]
    assert weight_reads and all(r.range and r.range.startswith("bytes=0-") for r in weight_reads)


def test_merge_from_the_hub_equals_the_local_merge_and_pins_every_source(
    hub, llama_family, tmp_path
):
    before = len(hub.hub.requests)
    out = tmp_path / "merged"
    run = mergebot(
        hub,
        tmp_path,
        "merge",
        str(write_recipe(tmp_path, RECIPE.format(pin=""))),
        str(out),
        "--quiet",
    )
    assert run.returncode == 0, run.stderr
    base, (a, b, _) = llama_family
    expected = two_model_ties(base, a, b)
    merged = load_weights(out)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)

    fetched = {
        r.path.rsplit("/", 1)[-1] for r in hub.hub.requests[before:] if "/resolve/" in r.path
    }
    assert fetched <= {"model.safetensors", "config.json", "generation_config.json"}
    assert "optimizer.pt" not in fetched
    recipe = (out / "mergebot_recipe.yaml").read_text()
    card = (out / "README.md").read_text()
    for name in ("base", "math", "code"):
        assert f"alice/{name}@{hub.shas[name]}" in recipe
        assert f"`{hub.shas[name]}`" in card
    request = urllib.request.Request(
        f"{hub.url}/api/validate-yaml",
        json.dumps({"content": card, "repoType": "model"}).encode(),
        {"Content-Type": "application/json"},
    )
    assert json.load(urllib.request.urlopen(request))["errors"] == []


def test_a_pinned_revision_is_read_even_after_the_repo_moves_on(hub, llama_family, tmp_path):
    old = hub.shas["math"]
    _, (_, _, other) = llama_family
    hub.api.upload_file(
        repo_id="alice/math",
        path_or_fileobj=other / "model.safetensors",
        path_in_repo="model.safetensors",
    )
    assert hub.api.model_info("alice/math").sha != old
    pinned, latest = tmp_path / "pinned", tmp_path / "latest"
    for folder, pin in ((pinned, f"@{old}"), (latest, "")):
        recipe = write_recipe(tmp_path, RECIPE.format(pin=pin))
        assert mergebot(hub, tmp_path, "merge", str(recipe), str(folder), "--quiet").returncode == 0
    base, (a, b, _) = llama_family
    expected = two_model_ties(base, a, b)
    assert torch.equal(load_weights(pinned)["lm_head.weight"], expected["lm_head.weight"])
    assert not torch.equal(load_weights(latest)["lm_head.weight"], expected["lm_head.weight"])
    assert f"alice/math@{old}" in (pinned / "mergebot_recipe.yaml").read_text()


def test_private_repo_is_unreadable_without_its_owners_token(hub, llama_family, tmp_path):
    hub.api.create_repo("alice/secret", private=True)
    hub.api.upload_folder(repo_id="alice/secret", folder_path=llama_family[1][0])
    recipe = write_recipe(
        tmp_path,
        "merge_method: ties\nbase_model: alice/base\nmodels: [{model: alice/secret, parameters: {weight: 1}}]\n",
    )
    run = mergebot(hub, tmp_path, "validate", str(recipe))
    assert run.returncode == 1
    assert run.stderr.strip() == (
        "error: model repo alice/secret does not exist on the Hub or is private; check the name, or log in with a token that can read it"
    )
    assert mergebot(hub, tmp_path, "validate", str(recipe), token=TOKEN).returncode == 0


def test_unknown_revision_names_it(hub, tmp_path):
    recipe = write_recipe(tmp_path, RECIPE.format(pin="@no-such-branch"))
    run = mergebot(hub, tmp_path, "validate", str(recipe))
    assert (
        run.stderr.strip()
        == "error: alice/math has no revision 'no-such-branch'; use a branch, tag or commit that exists"
    )


def test_a_config_only_base_has_its_config_read_but_not_its_weights(hub, tmp_path):
    recipe = write_recipe(
        tmp_path,
        "merge_method: linear\nbase_model: alice/base\nmodels: [{model: alice/math}, {model: alice/code}]\nparameters: {weight: 1}\n",
    )
    before = len(hub.hub.requests)
    run = mergebot(hub, tmp_path, "merge", str(recipe), str(tmp_path / "out"), "--quiet")
    assert run.returncode == 0, run.stderr
    base_weights = [
        r
        for r in hub.hub.requests[before:]
        if r.path.startswith("/alice/base/")
        and r.path.endswith(".safetensors")
        and r.method == "GET"
    ]
    assert all(r.range for r in base_weights)  # header reads only, no download
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| config donor |" in card and "- alice/base" not in card.split("---")[1]
