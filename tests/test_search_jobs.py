"""Evolutionary searches as bot jobs, through the JSON API against the sandbox hub: the one
submit path with its limits, the trials as they come, and one commit whose card holds the
fitness table that the published model reproduces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import snapshot_download
from service_env import job_commits, start_sandbox, start_serve

from merge_engine.evolve.spec import spec_from_text
from merge_engine.example import make_family, save_tiny_tokenizer
from merge_engine.run import resolve_device
from service.search_steps import held_out_fitness

pytestmark = pytest.mark.slow  # real processes: a server with its worker, the sandbox hub

ALICE = "tok-alice"
TEXTS = ["abc def ghi", "the cat sat", "hello world", "one two three", "a b c d e", "xyz 123"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("search-jobs")
    family = make_family(root / "models", scale=0.05, initializer_range=0.2)
    for folder in (family[0], *family[1]):
        save_tiny_tokenizer(folder)
    server = start_sandbox({"alice": family})
    yield server
    server.__exit__()


def search_spec(trials: int = 8, extra: str = "", examples: list[str] | None = None) -> str:
    return f"""space: parameters
models: [{{model: alice/math}}, {{model: alice/code}}]
base_model: alice/base
fitness:
  - kind: nll
    data: {{examples: {json.dumps(examples or TEXTS * 4)}}}
budget: {{trials: {trials}, population: 4}}
{extra}"""


def card_cell(card: str, row: str, column: int) -> str:
    line = next(line for line in card.splitlines() if line.startswith(f"| {row}"))
    return [cell.strip().strip("*") for cell in line.strip("|").split("|")][column]


def test_a_search_through_the_api_publishes_one_commit_with_its_fitness_table(hub, tmp_path):
    process, bot = start_serve(hub.url, tmp_path / "work")
    try:
        body = {"spec": search_spec(), "target": "alice/searched"}
        status, job = bot.call("POST", "/api/searches", body, ALICE)
        assert status == 202, job
        assert job["kind"] == "search" and job["status"] == "queued"
        again = bot.call("POST", "/api/searches", body, ALICE)[1]
        assert again["id"] == job["id"], "asking twice gives the same job"
        done = bot.wait_done(job["id"])
        assert done["status"] == "succeeded", done
        status, view = bot.call("GET", f"/api/searches/{job['id']}", token=ALICE)
        trials = bot.call("GET", f"/api/searches/{job['id']}/trials", token=ALICE)[1]
    finally:
        process.stop()
    assert status == 200 and view["done"] == view["budget"] == 8
    assert [t["index"] for t in view["trials"]] == list(range(8))
    best = [t["best"] for t in view["trials"]]
    assert best == [max(t["fitness"] for t in view["trials"][: i + 1]) for i in range(8)]
    assert len(trials) == 8 and all("weight.m0.g0" in t["params"] for t in trials)
    assert {t["worker"] for t in trials} == {"test-serve"}

    assert len(job_commits(hub.url, "alice/searched", ALICE)) == 1
    published = Path(snapshot_download("alice/searched", token=ALICE, endpoint=hub.url))
    card = (published / "README.md").read_text()
    assert "## Evolutionary search" in card and "![fitness per trial](evolve/fitness.png)" in card
    assert (published / "evolve" / "fitness.png").stat().st_size > 0
    assert card_cell(card, "source alice/math", 0).startswith("source alice/math")
    assert "uniform ties merge" in card
    assert job["id"] in card and "Requested by alice" in card
    # the winner as published scores on the held-out split what its card says
    spec = spec_from_text(search_spec())
    device = resolve_device("cpu")
    measured = held_out_fitness(published, spec, device, False, tmp_path / "cache")
    assert f"{measured:.4g}" == card_cell(card, "**this merge**", 2)
    assert done["outcome"]["rows"][0]["held_out"] == pytest.approx(measured, abs=1e-6)
