"""Evolutionary searches as bot jobs, through the JSON API against the sandbox hub: the one
submit path with its limits, the trials as they come, and one commit whose card holds the
fitness table that the published model reproduces."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import SEARCH_TEXTS
from huggingface_hub import HfApi, snapshot_download
from postgres_server import postgres_url
from rendered import HOSTILE
from service_env import (
    BOT_TOKEN,
    MergebotProcess,
    job_commits,
    service_env,
    start_sandbox,
    start_serve,
    ties_recipe,
    wait_until,
)

from merge_engine.evolve.report import wall_time_text
from merge_engine.evolve.spec import spec_from_text
from merge_engine.run.executor import resolve_device
from service.workflows.search_steps import held_out_fitness

pytestmark = pytest.mark.slow  # real processes: a server with its worker, the sandbox hub

ALICE, BOB = "tok-alice", "tok-bob"


@pytest.fixture(scope="module")
def hub(tmp_path_factory, scored_family):
    root = tmp_path_factory.mktemp("search-jobs")
    server = start_sandbox({"alice": scored_family})
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": text}) + "\n" for text in SEARCH_TEXTS))
    carol = HfApi(endpoint=server.url, token="tok-carol")
    carol.create_repo("carol/secret", repo_type="dataset", private=True)
    carol.upload_file(
        path_or_fileobj=rows, path_in_repo="rows.jsonl", repo_id="carol/secret", repo_type="dataset"
    )
    yield server
    server.__exit__()


def search_spec(trials: int = 8, extra: str = "", examples: list[str] | None = None) -> str:
    return f"""space: parameters
models: [{{model: alice/math}}, {{model: alice/code}}]
base_model: alice/base
fitness:
  - kind: nll
    data: {{examples: {json.dumps(examples or SEARCH_TEXTS * 4)}}}
budget: {{trials: {trials}, population: 4}}
{extra}"""


def card_cell(card: str, row: str, column: int) -> str:
    line = next(line for line in card.splitlines() if line.startswith(f"| {row}"))
    return [cell.strip().strip("*") for cell in line.strip("|").split("|")][column]


def assert_card_states_the_logged_search_time(job: dict) -> None:
    """The card's duration is the search stage's time in the job's log: one measure, the wall
    time ``budget.wall_time`` counts (every turn's, not the last one's)."""
    log = "\n".join(job["log"])
    seconds = float(re.search(r"^search: done in ([\d.]+) s$", log, re.MULTILINE)[1])
    assert f"trials in {wall_time_text(seconds)}." in job["card"], (log, job["card"])


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
    # the sources and the uniform merge, scored before the first trial, for the live plot
    baselines = [b["model"] for b in view["baselines"]]
    assert baselines == [row["model"] for row in done["outcome"]["rows"][1:]]
    assert [b["model"].split("@")[0] for b in view["baselines"]][:2] == [
        "source alice/math",
        "source alice/code",
    ]
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
    assert_card_states_the_logged_search_time(done)
    # the winner as published scores on the held-out split what its card says
    spec = spec_from_text(search_spec())
    device = resolve_device("cpu")
    measured = held_out_fitness(published, spec, device, False, tmp_path / "cache")
    assert f"{measured:.4g}" == card_cell(card, "**this merge**", 2)
    assert done["outcome"]["rows"][0]["held_out"] == pytest.approx(measured, abs=1e-6)


def test_limits_and_server_paths_are_refused_before_a_search_starts(hub, tmp_path):
    limits = {
        "MERGEBOT_MAX_SEARCH_TRIALS": "10",
        "MERGEBOT_MAX_SEARCH_HOURS": "0.5",
        "MERGEBOT_SEARCH_TRIALS_DAILY": "12",
    }
    process, bot = start_serve(hub.url, tmp_path / "work", "--no-worker", **limits)

    def refusal(spec: str, target: str = "alice/limited") -> dict:
        status, body = bot.call("POST", "/api/searches", {"spec": spec, "target": target}, ALICE)
        assert status == 400, body
        return body

    try:
        over = refusal(search_spec(trials=11))
        assert over["field"] == "budget.trials"
        assert "11 trials, more than the 10 this bot runs per search" in over["error"]
        both = refusal(search_spec(trials=6).replace("space: parameters", "space: both"))
        assert "12 trials, more than the 10" in both["error"], "both stages count"
        long = refusal(
            search_spec(extra="").replace("population: 4}", "population: 4, wall_time: 2h}")
        )
        assert long["field"] == "budget.wall_time"
        assert "2 h of wall time, more than the 30 min" in long["error"]
        named = search_spec().replace(
            "- kind: nll", f"- name: {json.dumps(HOSTILE)}\n    kind: nll"
        )
        markup = refusal(named)
        assert markup["field"] == "fitness[0].name", markup
        assert "letters, digits, spaces, '_', '.' or '-'" in markup["error"]
        local = refusal(search_spec().replace("alice/code", str(tmp_path)))
        assert local["field"] == "models" and "not a Hub model" in local["error"]
        on_server = search_spec().split("fitness:")[0] + (
            "fitness: [{kind: nll, data: {path: /etc/rows.jsonl}}]\nbudget: {trials: 8}\n"
        )
        assert refusal(on_server)["field"] == "fitness[0].data.path"
        harness = on_server.replace(
            "{kind: nll, data: {path: /etc/rows.jsonl}}", "{kind: lm_eval, task: /etc/task.yaml}"
        )
        lm_eval_task = refusal(harness)  # lm-eval's Jinja templates would run unsandboxed
        assert lm_eval_task["field"] == "fitness[0].kind"
        assert "Jinja templates outside a sandbox" in lm_eval_task["error"]
        private = on_server.replace("{path: /etc/rows.jsonl}", "{dataset: carol/secret}")
        assert "carol/secret" in refusal(private)["error"], "someone else's private data"

        status, first = bot.call(
            "POST", "/api/searches", {"spec": search_spec(), "target": "alice/day-1"}, ALICE
        )
        assert status == 202, first
        # the same search again is the same job, not a second share of the day
        again = bot.call(
            "POST", "/api/searches", {"spec": search_spec(), "target": "alice/day-1"}, ALICE
        )
        assert again[1]["id"] == first["id"]
        # and so is the spec sent by `mergebot submit`, which tells a spec from a recipe
        spec_file = tmp_path / "spec.yaml"
        spec_file.write_text(search_spec())
        command = [sys.executable, "-m", "service.cli", "submit", str(spec_file)]
        command += ["--to", "alice/day-1", "--server", bot.url]
        env = {**os.environ, "HF_TOKEN": ALICE}
        printed = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        assert printed.stdout.startswith(f"{first['id']}: queued"), printed
        daily = refusal(search_spec(examples=SEARCH_TEXTS * 3), "alice/day-2")
        assert "alice would run 16 search trials today, more than the 12" in daily["error"]
        # a spec without wall_time runs for at most the bot's time per search
        assert "wall_time: 1800.0" in first["recipe"]
    finally:
        process.stop()


def test_a_search_whose_first_model_has_no_tokenizer_is_refused_at_submit_naming_the_task(
    hub, tmp_path, scored_family
):
    """Seen in the repo's file list at submit, before anything is queued or downloaded."""
    _, (math, _) = scored_family
    HfApi(endpoint=hub.url, token=ALICE).create_repo("alice/bare")
    HfApi(endpoint=hub.url, token=ALICE).upload_folder(
        repo_id="alice/bare",
        folder_path=math,
        allow_patterns=["config.json", "*.safetensors"],
    )
    process, bot = start_serve(hub.url, tmp_path / "work", "--no-worker")
    try:
        spec = search_spec().replace("model: alice/math", "model: alice/bare")
        body = {"spec": spec, "target": "alice/bare-search"}
        status, refused = bot.call("POST", "/api/searches", body, ALICE)
        assert status == 400, refused
        assert refused["field"] == "fitness[0]"
        assert refused["error"] == (
            "fitness[0]: the 'nll' task tokenizes its text with the tokenizer of the first model, "
            "alice/bare, which has no tokenizer files (tokenizer.json, tokenizer_config.json, "
            "...); list alice/code, which has them, first in models"
        )
        assert bot.call("GET", "/api/jobs")[1] == []
    finally:
        process.stop()


def test_no_search_locks_its_requester_out_and_simultaneous_ones_keep_the_daily_limit(
    hub, tmp_path
):
    """A spec sent small whose stored (normalised) form is over the recipe size limit used to
    lock its requester — every anonymous user at once — out of searches for a day, and 20
    simultaneous submits used to book past the daily trial limit."""
    limits = {
        "MERGEBOT_MAX_RECIPE_KB": "16",
        "MERGEBOT_MAX_QUEUED": "30",
        "MERGEBOT_MAX_QUEUED_ANONYMOUS": "30",
        "MERGEBOT_SEARCH_TRIALS_DAILY": "100",
        "MERGEBOT_MAX_SEARCH_HOURS": "0.1",  # each books 6 min of the day's 24 h
    }
    process, bot = start_serve(hub.url, tmp_path / "work", "--no-worker", **limits)
    long = json.dumps("abc def " * 500)  # 4,000 characters, sent once, stored eight times
    expanding = search_spec().replace(
        f"examples: {json.dumps(SEARCH_TEXTS * 4)}", f"examples: [&long {long}{', *long' * 7}]"
    )
    assert len(expanding.encode()) < 16 * 1024

    def submit(spec: str, target: str, token: str | None = None) -> tuple[int, dict]:
        return bot.call("POST", "/api/searches", {"spec": spec, "target": target}, token)

    try:
        status, first = submit(expanding, "mergebot/expanding")
        assert status == 202, first
        assert len(bot.job(first["id"])["recipe"].encode()) > 16 * 1024, "stored expanded"
        # the next anonymous search, someone else's, is not refused for bytes it never sent
        status, second = submit(search_spec(), "mergebot/another")
        assert status == 202, second

        start = threading.Barrier(20)

        def at_once(number: int) -> tuple[int, dict]:
            start.wait()
            return submit(search_spec(), f"alice/day-{number}", ALICE)

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(at_once, range(20)))
    finally:
        process.stop()
    accepted = [body for status, body in answers if status == 202]
    refused = [body for status, body in answers if status != 202]
    assert len(accepted) == 12, answers  # 12 × 8 trials; a 13th would book 104 of 100
    assert all(body["field"] == "budget.trials" for body in refused), refused
    assert all("alice would run 104 search trials today" in body["error"] for body in refused)


SLOW_EXAMPLES = [" ".join(SEARCH_TEXTS)] * 96
"""Trials of a few tenths of a second: a search that is still running when the test acts."""


def test_a_stopped_search_publishes_its_best_so_far_and_a_cancelled_one_nothing(hub, tmp_path):
    process, bot = start_serve(hub.url, tmp_path / "work")

    def start(target: str) -> str:
        spec = search_spec(trials=200, examples=SLOW_EXAMPLES)
        status, job = bot.call("POST", "/api/searches", {"spec": spec, "target": target}, ALICE)
        assert status == 202, job

        def trials_done() -> int:
            return bot.call("GET", f"/api/searches/{job['id']}", token=ALICE)[1]["done"]

        wait_until(lambda: trials_done() >= 3, "three trials")
        return job["id"]

    try:
        stopped = start("alice/best-so-far")
        status, body = bot.call(
            "POST", f"/api/jobs/{stopped}/cancel?publish_best=true", token=ALICE
        )
        assert status == 200 and body["finish_early"], body
        done = bot.wait_done(stopped)
        assert done["status"] == "succeeded", done
        trials = done["outcome"]["trials"]
        assert 3 <= trials < 200

        cancelled = start("alice/cancelled")
        assert bot.call("POST", f"/api/jobs/{cancelled}/cancel", token=ALICE)[0] == 200
        assert bot.wait_done(cancelled)["status"] == "cancelled"
    finally:
        process.stop()
    assert len(job_commits(hub.url, "alice/best-so-far", ALICE)) == 1
    readme = (
        Path(snapshot_download("alice/best-so-far", token=ALICE, endpoint=hub.url))
        .joinpath("README.md")
        .read_text()
    )
    assert f"{trials} of 200 trials" in readme
    assert not HfApi(endpoint=hub.url, token=ALICE).repo_exists("alice/cancelled")


def test_a_merge_and_another_requesters_search_run_while_a_long_search_runs(hub, tmp_path):
    """Searches have a lane of their own, and take turns in it: a one-minute merge used to
    wait behind a search for its whole wall time, and a second requester's search too."""
    process, bot = start_serve(hub.url, tmp_path / "work", MERGEBOT_SEARCH_SLICE_MINUTES="0")

    def start(target: str, token: str) -> str:
        spec = search_spec(trials=200, examples=SLOW_EXAMPLES)
        status, job = bot.call("POST", "/api/searches", {"spec": spec, "target": target}, token)
        assert status == 202, job
        return job["id"]

    def view(job_id: str) -> dict:
        return bot.call("GET", f"/api/searches/{job_id}", token=BOT_TOKEN)[1]

    try:
        long = start("alice/long-search", ALICE)
        wait_until(lambda: view(long)["done"] >= 1, "the first trial")
        status, merge = bot.submit(ties_recipe("alice"), "alice/quick-merge", ALICE)
        assert status == 202, merge
        assert bot.wait_done(merge["id"])["status"] == "succeeded"
        searching = view(long)
        assert searching["job"]["status"] == "running" and searching["done"] < 200, searching

        other = start("bob/other-search", BOB)

        def both_progress() -> bool:
            views = [view(long), view(other)]
            assert all(v["job"]["status"] in ("queued", "running") for v in views), views
            return all(
                v["done"] >= view_done + 2 for v, view_done in zip(views, before, strict=True)
            )

        before = [searching["done"], 0]
        wait_until(both_progress, "trials of both searches while both run")
        for job_id, token in ((long, ALICE), (other, BOB)):
            assert bot.call("POST", f"/api/jobs/{job_id}/cancel", token=token)[0] == 200
            assert bot.wait_done(job_id)["status"] == "cancelled"
            # a search cancelled while it waits is cleaned up by its next turn, at once
            folder = tmp_path / "work" / "jobs" / job_id
            wait_until(lambda folder=folder: not folder.exists(), f"{folder} removed")
    finally:
        process.stop()


def test_searches_taking_turns_survive_a_killed_worker_and_run_no_trial_twice(hub, tmp_path):
    """Two searches alternate one trial a turn on one worker; the worker is killed in the
    middle and restarted under its id: both finish their budgets, each trial once."""
    budget = 10
    work = tmp_path / "work"
    serve, bot = start_serve(hub.url, work, "--no-worker")
    env = service_env(hub.url, work, MERGEBOT_SEARCH_SLICE_MINUTES="0")

    def start_worker() -> MergebotProcess:
        return MergebotProcess(["worker", "--id", "turn-worker"], env, tmp_path / "worker.log")

    def trials(job_id: str) -> list[dict]:
        return bot.call("GET", f"/api/searches/{job_id}/trials", token=ALICE)[1]

    worker = start_worker()
    try:
        jobs = []
        for target in ("alice/turns-1", "alice/turns-2"):
            body = {"spec": search_spec(trials=budget), "target": target}
            status, job = bot.call("POST", "/api/searches", body, ALICE)
            assert status == 202, job
            jobs.append(job["id"])
        wait_until(lambda: all(len(trials(j)) >= 2 for j in jobs), "two turns of each")
        worker.kill()
        worker = start_worker()  # resumes the turn it was running; the other is queued
        done = [bot.wait_done(j) for j in jobs]
        final = [trials(j) for j in jobs]
    finally:
        worker.stop()
        serve.stop()
    assert [d["status"] for d in done] == ["succeeded", "succeeded"], (done, worker.log)
    for job, found in zip(done, final, strict=True):
        assert len(found) == budget == job["outcome"]["trials"]
        assert len({json.dumps(t["params"], sort_keys=True) for t in found}) == budget
        assert len(job_commits(hub.url, job["target"], ALICE, job["id"])) == 1
        assert_card_states_the_logged_search_time(job)
    assert "waits for its next turn" in "\n".join(done[0]["log"] + done[1]["log"])


def test_two_postgres_workers_share_a_search_that_survives_a_killed_worker(hub, tmp_path):
    budget = 60
    workers: dict[str, MergebotProcess] = {}
    with postgres_url() as database:
        settings = {"MERGEBOT_DATABASE_URL": database}
        serve, bot = start_serve(hub.url, tmp_path / "api", "--no-worker", **settings)

        def start_worker(name: str) -> MergebotProcess:
            env = service_env(hub.url, tmp_path / name, OMP_NUM_THREADS="1", **settings)
            return MergebotProcess(["worker", "--id", name], env, tmp_path / f"{name}.log")

        def trials() -> list[dict]:
            return bot.call("GET", f"/api/searches/{job['id']}/trials", token=ALICE)[1]

        try:
            for name in ("search-worker-1", "search-worker-2"):
                workers[name] = start_worker(name)
            spec = search_spec(trials=budget, examples=SLOW_EXAMPLES)
            body = {"spec": spec, "target": "alice/shared-search"}
            status, job = bot.call("POST", "/api/searches", body, ALICE)
            assert status == 202, job
            wait_until(lambda: {t["worker"] for t in trials()} == set(workers), "both workers")
            owner = bot.job(job["id"])["worker"]
            workers[owner].kill()  # in the middle of a trial: one is always running
            assert bot.job(job["id"])["status"] == "running"
            workers[owner] = start_worker(owner)  # resumes its search under the same id
            done = bot.wait_done(job["id"])
            assert done["status"] == "succeeded", (done, workers[owner].log)
            final = trials()
        finally:
            for process in [*workers.values(), serve]:
                process.stop()
    assert done["merge_runs"] == 2, "the search step ran again after the kill"
    assert len(final) == budget == done["outcome"]["trials"]
    assert len({(t["stage"], t["number"]) for t in final}) == budget
    assert len({json.dumps(t["params"], sort_keys=True) for t in final}) == budget  # none twice
    assert {t["worker"] for t in final} == set(workers)
    assert len(job_commits(hub.url, "alice/shared-search", ALICE, job["id"])) == 1


def test_a_search_too_big_for_its_budget_is_refused_at_submit_naming_the_cap(
    hub, scored_family, tmp_path
):
    from safetensors import safe_open

    with safe_open(scored_family[0] / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    # 400 distinct filters that each match a tensor: beginnings of the tensor names
    filters = ", ".join(sorted({n[:k] for n in names for k in range(8, len(n) + 1)})[:400])
    process, bot = start_serve(hub.url, tmp_path / "work", "--no-worker")

    def refusal(spec: str) -> dict:
        status, body = bot.call(
            "POST", "/api/searches", {"spec": spec, "target": "alice/big"}, ALICE
        )
        assert status == 400, body
        return body

    try:
        genes = refusal(search_spec(extra=f"parameters: {{filters: [{filters}]}}"))
        assert genes["field"] == "parameters.filters"
        assert "has 6,416 genes" in genes["error"]
        assert "more than the 5,000 allowed" in genes["error"]
        population = refusal(search_spec().replace("population: 4", "population: 1000000000"))
        assert population["field"] == "budget.population"
        assert "must be at most 1000" in population["error"]
        many = search_spec().replace(
            "fitness:\n",
            "fitness:\n"
            + "".join(
                f"  - {{kind: nll, name: t{i}, data: {{examples: [abc, def]}}}}\n"
                for i in range(3000)
            ),
        )
        tasks = refusal(many)
        assert tasks["field"] == "fitness"
        assert "3,001 fitness tasks, more than the 16 this bot scores per trial" in tasks["error"]
        long = refusal(search_spec(examples=["x" * 8193, *SEARCH_TEXTS]))
        assert long["field"] == "fitness[0].data.examples[0]"
        assert "8,193 characters long, more than the 8,192 allowed" in long["error"]
        for extra, field in [
            ("seed: 4294967296", "seed"),
            ("parameters: {search: {weight: [0, .nan]}}", "parameters.search.weight[1]"),
        ]:
            assert refusal(search_spec(extra=extra))["field"] == field
        weight = refusal(search_spec().replace("kind: nll", "kind: nll\n    weight: .inf"))
        assert weight["field"] == "fitness[0].weight" and "finite" in weight["error"]
    finally:
        process.stop()


def test_a_cancel_stops_a_slow_trial_within_seconds(hub, tmp_path):
    rows = tmp_path / "long.jsonl"
    text = ((" ".join(SEARCH_TEXTS) + " ") * 64)[:1024]
    rows.write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(1200)))
    api = HfApi(endpoint=hub.url, token=ALICE)
    api.create_repo("alice/long-texts", repo_type="dataset", exist_ok=True)
    api.upload_file(
        path_or_fileobj=rows,
        path_in_repo="rows.jsonl",
        repo_id="alice/long-texts",
        repo_type="dataset",
    )
    # 1,200 texts of 1,024 tokens, one per batch: a trial's scoring takes about a minute
    spec = f"""space: parameters
models: [{{model: alice/math}}]
base_model: alice/base
fitness:
  - kind: nll
    max_length: 1024
    batch_size: 1
    data: {{dataset: alice/long-texts}}
    held_out: {{examples: {json.dumps(SEARCH_TEXTS)}}}
budget: {{trials: 8, population: 4}}
"""
    process, bot = start_serve(hub.url, tmp_path / "work", OMP_NUM_THREADS="1")
    try:
        status, job = bot.call(
            "POST", "/api/searches", {"spec": spec, "target": "alice/slow"}, ALICE
        )
        assert status == 202, job

        def status_of() -> dict:
            return bot.call("GET", f"/api/searches/{job['id']}", token=ALICE)[1]

        # the source is scored (as long as a trial's scoring), then trial 0 starts at once
        wait_until(lambda: status_of()["baselines"], "the source's baseline", 300)
        assert status_of()["done"] == 0
        asked = time.monotonic()
        assert bot.call("POST", f"/api/jobs/{job['id']}/cancel", token=ALICE)[0] == 200
        done = bot.wait_done(job["id"], deadline=60)
        waited = time.monotonic() - asked
        assert done["status"] == "cancelled", done
        assert waited < 15, f"the trial went on for {waited:.0f} s after the cancel"
        assert status_of()["done"] == 0
    finally:
        process.stop()
    assert not HfApi(endpoint=hub.url, token=ALICE).repo_exists("alice/slow")


def test_a_non_finite_fitness_fails_the_search_at_once_and_the_status_stays_json(hub, tmp_path):
    # float16 weights overflow for task-vector weights far from 1: the logits are not finite
    spec = search_spec(
        trials=200,
        extra="parameters: {method: task_arithmetic, search: {weight: [-100000, 100000]}, dtype: float16}",
    )
    process, bot = start_serve(hub.url, tmp_path / "work")
    try:
        status, job = bot.call(
            "POST", "/api/searches", {"spec": spec, "target": "alice/nan"}, ALICE
        )
        assert status == 202, job
        done = bot.wait_done(job["id"])
        # Api.call reads JSON strictly: a NaN or Infinity in the body fails the test
        status, view = bot.call("GET", f"/api/searches/{job['id']}", token=ALICE)
    finally:
        process.stop()
    assert done["status"] == "failed", done
    assert "of the parameters search has fitness nan (task nll scored nan)" in done["error"]
    assert "narrow the searched bounds" in done["error"]
    assert status == 200 and view["done"] < 10, "failed at the first non-finite fitness"


def test_a_job_that_does_not_fit_the_disk_is_refused_at_submit_and_before_its_download(
    hub, tmp_path
):
    """The free-space reading is real; the margin the bot keeps free makes a tiny job too big."""
    work = tmp_path / "work"
    huge = {"MERGEBOT_DISK_MARGIN_GB": "1000000"}
    process, bot = start_serve(hub.url, work, "--no-worker", **huge)
    try:
        status, refusal = bot.submit(ties_recipe("alice"), "alice/no-room", ALICE)
        spec = {"spec": search_spec(), "target": "alice/no-room-search"}
        search_status, search_refusal = bot.call("POST", "/api/searches", spec, ALICE)
    finally:
        process.stop()
    for code, body in ((status, refusal), (search_status, search_refusal)):
        assert code == 507, body
        assert body["error"].startswith("the bot's disk has "), body
        assert (
            "plus the 1,000,000.0 GB the bot keeps free (MERGEBOT_DISK_MARGIN_GB)" in body["error"]
        )
    # queued where there was room; the worker's own disk has none: it fails before downloading
    process, bot = start_serve(hub.url, work, "--no-worker", MERGEBOT_DISK_MARGIN_GB="0")
    worker = None
    try:
        status, job = bot.submit(ties_recipe("alice"), "alice/no-room", ALICE)
        assert status == 202, job
        env = service_env(hub.url, work, **huge)
        worker = MergebotProcess(["worker", "--id", "full-worker"], env, tmp_path / "w.log")
        done = bot.wait_done(job["id"])
    finally:
        for running in (worker, process):
            if running:
                running.stop()
    assert done["status"] == "failed" and done["stage"] == "download", done
    assert done["error"].startswith("the worker's disk has "), done
    assert not (work / "jobs" / job["id"]).exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MB tmpfs: a real disk that a test can fill (mounting needs root)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """Write a file into ``folder`` until its disk refuses another byte."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as file:
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    file.write(b"\0" * chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
    return filler


def test_a_disk_that_fills_mid_search_fails_that_job_only_and_removes_its_folder(
    hub, tmp_path, small_disk
):
    """The work dir on a real 32 MB disk (the database beside it, elsewhere), filled up while a
    search runs its trials: the search fails with a sentence, its folder is removed, and the
    next job runs."""
    database = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    process, bot = start_serve(
        hub.url, small_disk, MERGEBOT_DATABASE_URL=database, MERGEBOT_DISK_MARGIN_GB="0"
    )
    try:
        spec = search_spec(trials=200, examples=SLOW_EXAMPLES)
        body = {"spec": spec, "target": "alice/disk-full"}
        status, job = bot.call("POST", "/api/searches", body, ALICE)
        assert status == 202, job

        def trials_done() -> int:
            return bot.call("GET", f"/api/searches/{job['id']}", token=ALICE)[1]["done"]

        wait_until(lambda: trials_done() >= 1, "the first trial")
        filler = fill(small_disk)
        failed = bot.wait_done(job["id"])
        assert failed["status"] == "failed", failed
        assert failed["error"].startswith("the worker's disk is full (OSError during search)")
        assert str(small_disk) not in failed["error"]
        assert not (small_disk / "jobs" / job["id"]).exists()

        filler.unlink()
        status, merge = bot.submit(ties_recipe("alice"), "alice/after-full", ALICE)
        assert status == 202, merge
        assert bot.wait_done(merge["id"])["status"] == "succeeded"
    finally:
        process.stop()
