"""Diffusion checkpoints on the Hub: diffusers repos and single-file repos read through the real
``huggingface_hub`` client in a ``mergebot`` subprocess, against the sandbox hub on 127.0.0.1:
told apart from file names and headers (range requests), downloaded only as far as needed,
merged to the same tensors as the local files."""

from __future__ import annotations

import pytest
import torch
from conftest import write_recipe
from huggingface_hub import HfApi
from safetensors.torch import load_file
from test_sources_hub import TOKEN, mergebot

from merge_engine.example_diffusion import make_finetune, make_pipeline, write_single_file
from service.sandbox_hub import HubStore, SandboxHub, SandboxServer

pytestmark = pytest.mark.slow  # each test starts mergebot in a subprocess

RECIPE = """merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.6}}
  - model: {b}
    parameters:
      weight: {{blocks: "{row}"}}
output_layout: single_file
"""
ROW = ",".join(["0.4"] * 13 + ["1"] + ["0.2"] * 12)  # BASE, IN00…IN11, M00 = 1, OUT00…OUT11


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """alice's two SD1.5 pipelines in diffusers layout, one as a single-file repo, and a repo
    holding two single files."""
    root = tmp_path_factory.mktemp("sd-hub")
    base = make_pipeline(root / "a", "sd1", seed=0)
    tuned = make_finetune(base, root / "b", seed=1, noise=0.05)
    single = root / "single"
    single.mkdir()
    write_single_file(tuned, single / "dreamy_v1.safetensors", "sd1")
    sandbox = SandboxHub(HubStore(), users={TOKEN: "alice"})
    with SandboxServer(sandbox) as server:
        api = HfApi(endpoint=server.url, token=TOKEN)
        for name, folder in (("sd-a", base), ("sd-b", tuned), ("sd-file", single)):
            api.create_repo(f"alice/{name}")
            api.upload_folder(repo_id=f"alice/{name}", folder_path=folder)
        api.create_repo("alice/two-files")
        for file in ("x.safetensors", "y.safetensors"):
            api.upload_file(
                repo_id="alice/two-files",
                path_or_fileobj=single / "dreamy_v1.safetensors",
                path_in_repo=file,
            )
        server.local = {"a": base, "b": tuned}
        yield server


def test_diffusers_repos_merge_to_the_local_result_reading_headers_first(hub, tmp_path):
    before = len(hub.hub.requests)
    recipe = write_recipe(tmp_path, RECIPE.format(a="alice/sd-a", b="alice/sd-b", row=ROW))
    checked = mergebot(hub, tmp_path, "validate", str(recipe))
    assert checked.returncode == 0, checked.stderr
    assert "linear of 2 models" in checked.stdout
    reads = [r for r in hub.hub.requests[before:] if r.path.endswith(".safetensors")]
    assert reads and all(r.range and r.range.startswith("bytes=0-") for r in reads)

    run = mergebot(hub, tmp_path, "merge", str(recipe), str(tmp_path / "hub-out"), "--quiet")
    assert run.returncode == 0, run.stderr
    local = tmp_path / "local"
    local.mkdir()
    text = RECIPE.format(a=hub.local["a"], b=hub.local["b"], row=ROW)
    run = mergebot(
        hub,
        tmp_path,
        "merge",
        str(write_recipe(local, text)),
        str(tmp_path / "local-out"),
        "--quiet",
    )
    assert run.returncode == 0, run.stderr
    from_hub = load_file(tmp_path / "hub-out" / "model.safetensors")
    from_disk = load_file(tmp_path / "local-out" / "model.safetensors")
    assert from_hub.keys() == from_disk.keys()
    assert all(torch.equal(from_hub[k], from_disk[k]) for k in from_disk)
    card = (tmp_path / "hub-out" / "README.md").read_text()
    assert "library_name: diffusers" in card and "pipeline_tag: text-to-image" in card
    assert "- alice/sd-a\n- alice/sd-b" in card  # base_model lists the Hub sources


def test_a_single_file_repo_is_read_as_one_checkpoint(hub, tmp_path):
    recipe = f"merge_method: linear\nmodels:\n  - model: alice/sd-file\n    parameters: {{weight: 1}}\n  - model: {tmp_path / 'same.safetensors'}\n    parameters: {{weight: 1}}\n"
    write_single_file(hub.local["b"], tmp_path / "same.safetensors", "sd1")
    run = mergebot(
        hub,
        tmp_path,
        "merge",
        str(write_recipe(tmp_path, recipe)),
        str(tmp_path / "out"),
        "--quiet",
    )
    assert run.returncode == 0, run.stderr
    merged = load_file(tmp_path / "out" / "model.safetensors")
    expected = load_file(tmp_path / "same.safetensors")
    assert all(torch.equal(merged[k], expected[k]) for k in expected)  # (x + x) / 2 = x


def test_a_repo_of_several_single_files_is_refused_by_name(hub, tmp_path):
    recipe = "merge_method: linear\nmodels:\n  - model: alice/two-files\n  - model: alice/sd-file\n"
    run = mergebot(hub, tmp_path, "validate", str(write_recipe(tmp_path, recipe)))
    assert run.returncode == 1
    assert (
        "alice/two-files holds 2 single-file checkpoints (x.safetensors, y.safetensors); "
        "mergebot reads one checkpoint per repo: name a repo that holds one, or a local file"
    ) in run.stderr
