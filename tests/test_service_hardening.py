"""The bot's JSON API under crafted input and load, against a real ``mergebot serve`` and the
sandbox hub: bounded input refused before any Hub call, every refusal a 4xx ``{error, field}``,
names the Hub would refuse caught at submit, identities asked of the Hub once per token,
anonymous requesters kept apart, and "not yours" indistinguishable from "not there"."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from service_env import job_commits, start_sandbox, start_serve, ties_recipe, wait_until

pytestmark = pytest.mark.slow  # real processes: a server with its worker, the sandbox hub

ALICE, BOB, CAROL = "tok-alice", "tok-bob", "tok-carol"
SECRET = "webhook-secret"
MAX_BODY_KB = 64
HUB_TIMEOUT = 8  # seconds the bot waits for the Hub to say whose a token is


@pytest.fixture(scope="module")
def sandbox(llama_family):
    server = start_sandbox({"alice": llama_family, "carol": llama_family})
    server.hub.users.update({"tok-anonymous": "anonymous", "tok-dave": "dave"})
    yield server
    server.__exit__()


@pytest.fixture(scope="module")
def bot(sandbox, tmp_path_factory):
    work = tmp_path_factory.mktemp("hardening") / "work"
    process, api = start_serve(
        sandbox.url,
        work,
        MERGEBOT_WEBHOOK_SECRET=SECRET,
        MERGEBOT_MAX_BODY_KB=str(MAX_BODY_KB),
        MERGEBOT_HUB_TIMEOUT_SECONDS=str(HUB_TIMEOUT),
        MERGEBOT_IDENTITY_TTL_SECONDS="3600",  # the whoami counts below span the module
        MERGEBOT_MAX_QUEUED_ANONYMOUS="3",
    )
    api.work = work
    yield api
    process.stop()


def raw(bot, method: str, path: str, data: bytes, **headers: str) -> tuple[int, dict]:
    """A request with exactly this body (the JSON helper could not send a broken one)."""
    request = urllib.request.Request(bot.url + path, method=method, data=data, headers=headers)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def refused(answer: tuple[int, dict], status: int, field: str | None = None) -> str:
    """Assert a refusal's status and shape; return its sentence."""
    code, body = answer
    assert code == status, body
    assert set(body) == {"error", "field"}, body
    if field is not None:
        assert body["field"] == field, body
    return body["error"]


def hub_requests(sandbox, path_part: str = "", token: str | None = None) -> int:
    return sum(
        1
        for r in sandbox.hub.requests
        if path_part in r.path and (token is None or r.token == token)
    )


ALIAS_BOMB = """merge_method: regmean
models: [{model: alice/math}, {model: alice/code}]
calibration:
  examples:
    - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]
    - &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
    - &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
    - &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
    - &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
    - &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
    - &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
"""


def test_input_is_bounded_before_any_hub_call(bot, sandbox):
    bot.call("GET", "/api/jobs", token=ALICE)  # alice's identity is known from here on
    before = hub_requests(sandbox)

    bomb = bot.submit(ALIAS_BOMB, "alice/bomb", ALICE)
    assert "more than the 50,000 values allowed" in refused(bomb, 400)
    assert len(json.dumps(bomb[1])) < 400

    deep = "merge_method: linear\nmodels: " + "[" * 5000 + "]" * 5000
    assert "nests" in refused(bot.submit(deep, "alice/deep", ALICE), 400)

    many = "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: alice/m{i}\n" for i in range(100)
    )
    sentence = refused(bot.submit(many, "alice/many", ALICE), 400, "models")
    assert "reads 100 models, more than the 8" in sentence

    examples = "[" + ", ".join(["x"] * 2000) + "]"
    chatty = f"merge_method: regmean\nmodels: [{{model: alice/math}}]\ncalibration: {{examples: {examples}}}\n"
    sentence = refused(bot.submit(chatty, "alice/chatty", ALICE), 400, "calibration.examples")
    assert "2,000 inline examples, more than the 1,024" in sentence

    long_target = "alice/" + "x" * 20_000
    sentence = refused(bot.submit(ties_recipe("alice"), long_target, ALICE), 400, "target")
    assert len(sentence) < 400 and "x" * 100 not in sentence

    huge = ties_recipe("alice") + "#" * (MAX_BODY_KB * 1024)
    assert f"{MAX_BODY_KB} KB limit" in refused(bot.submit(huge, "alice/huge", ALICE), 413)

    assert hub_requests(sandbox) == before  # nothing above asked the Hub anything


def test_crafted_requests_get_a_4xx_sentence_never_a_500(bot):
    post = lambda data: raw(bot, "POST", "/api/jobs", data)  # noqa: E731
    assert "not valid JSON" in refused(post(b"hello"), 400)
    assert "not valid JSON" in refused(post(b'{"recipe": ' + b"[" * 30_000 + b"]" * 30_000), 400)
    nan = b'{"recipe": "merge_method: linear", "target": "alice/x", "private": NaN}'
    refused(post(nan), 400)
    refused(post(json.dumps({"target": "alice/x"}).encode()), 400, "recipe")
    maybe = {"recipe": "merge_method: linear", "target": "alice/x", "private": "maybe"}
    refused(post(json.dumps(maybe).encode()), 400, "private")
    extra = {"recipe": "merge_method: linear", "target": "alice/x", "colour": "red"}
    refused(post(json.dumps(extra).encode()), 400, "colour")

    for limit in (-1, 0, 100_000):
        refused(bot.call("GET", f"/api/jobs?limit={limit}"), 400, "limit")
    assert "there is no job" in refused(bot.call("GET", "/api/jobs/job-nothing"), 404)

    hook = "/api/webhooks/hub"
    refused(raw(bot, "POST", hook, b'{"event": 1}', **{"X-Webhook-Secret": SECRET}), 400)
    refused(raw(bot, "POST", hook, b"[[[[", **{"X-Webhook-Secret": SECRET}), 400)
    refused(raw(bot, "POST", hook, b"{}", **{"X-Webhook-Secret": "wrong"}), 401)


@pytest.mark.parametrize(
    ("target", "model", "field", "words"),
    [
        ("alice/modèle", "alice/math", "target", "is not a name the Hub accepts"),
        ("alice/x.", "alice/math", "target", "is not a name the Hub accepts"),
        ("alice/a--b", "alice/math", "target", "is not a name the Hub accepts"),
        ("alice/x.git", "alice/math", "target", "is not a name the Hub accepts"),
        ("alice/x\n", "alice/math", "target", "is not a name the Hub accepts"),
        ("alice/ok", "alice/a--b", "models", "is not a name the Hub accepts"),
        ("alice/ok", "alice/math@..", "models", "is not a branch, tag or commit name"),
    ],
)
def test_names_the_hub_would_refuse_are_refused_at_submit(
    bot, sandbox, target, model, field, words
):
    bot.call("GET", "/api/jobs", token=ALICE)
    before = hub_requests(sandbox)
    recipe = ties_recipe("alice").replace("alice/math", model)
    sentence = refused(bot.submit(recipe, target, ALICE), 400)
    assert words in sentence
    assert hub_requests(sandbox) == before


LOCAL_DATA = "calibration: {path: /etc/mergebot/rows.txt}\n"
"""A calibration block that ties never reads: the server path was published in the card."""


@pytest.mark.parametrize(
    ("recipe", "field"),
    [
        (ties_recipe("alice") + LOCAL_DATA, "calibration.path"),
        (
            ties_recipe("alice").replace("density: 0.5}\n", "density: 0.5}\n    " + LOCAL_DATA, 1),
            "models[0].calibration.path",
        ),
        (ties_recipe("alice") + "vae: /srv/models/vae.safetensors\n", "vae"),
        (ties_recipe("alice") + "tokenizer_source: /srv/models/tokenizer\n", "tokenizer_source"),
        (ties_recipe("alice") + "align: {reference: /srv/models/base}\n", "align.reference"),
    ],
    ids=["calibration", "a-model's-calibration", "vae", "tokenizer_source", "align.reference"],
)
def test_every_local_path_is_refused_at_submit_used_or_not(bot, sandbox, recipe, field):
    bot.call("GET", "/api/jobs", token=ALICE)
    before = hub_requests(sandbox)
    sentence = refused(bot.submit(recipe, "alice/local-path", ALICE), 400, field)
    assert "on the server" in sentence or "not a Hub model" in sentence
    assert hub_requests(sandbox) == before


def test_a_revision_that_does_not_exist_says_so_and_not_try_again(bot):
    recipe = ties_recipe("alice").replace("alice/math", "alice/math@refs/pr/9")
    sentence = refused(bot.submit(recipe, "alice/no-revision", ALICE), 400)
    assert "alice/math@refs/pr/9 (404)" in sentence and "does not exist" in sentence
    assert "again" not in sentence


def test_the_hub_is_asked_whose_a_token_is_once_and_a_slow_hub_stalls_nothing(bot, sandbox):
    status, job = bot.submit(ties_recipe("alice"), "alice/identity", ALICE, private=True)
    assert status == 202, job
    for _ in range(30):
        assert bot.call("GET", f"/api/jobs/{job['id']}", token=ALICE)[0] == 200
        assert bot.call("GET", f"/api/jobs/{job['id']}", token="tok-dave")[0] == 404
    assert hub_requests(sandbox, "/api/whoami-v2", ALICE) == 1
    assert hub_requests(sandbox, "/api/whoami-v2", "tok-dave") == 1

    assert "does not accept this token" in refused(bot.call("GET", "/api/jobs", token="nope"), 401)
    refused(bot.call("GET", "/api/jobs", token="nope"), 401)
    assert hub_requests(sandbox, "/api/whoami-v2", "nope") == 1

    # the Hub takes 60 s to answer a new token: that request waits its 8 s and gets a 503,
    # and meanwhile everything else is answered
    sandbox.hub.slow(60, "GET", r"/api/whoami-v2", times=1)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(bot.call, "GET", "/api/jobs", None, CAROL)
        wait_until(lambda: hub_requests(sandbox, "/api/whoami-v2", CAROL), "carol's whoami")
        assert bot.call("GET", "/api/health")[0] == 200
        assert bot.call("GET", f"/api/jobs/{job['id']}", token=ALICE)[0] == 200
        assert not waiting.done()
        assert "could not reach the Hub" in refused(waiting.result(), 503)
    assert bot.wait_done(job["id"])["status"] == "succeeded"


def test_anonymous_requesters_are_nobody_in_particular(bot, sandbox):
    status, first = bot.submit(ties_recipe("alice"), "mergebot/anonymous-merge")
    assert status == 202, first
    assert first["requester"] == "(anonymous)"
    assert bot.submit(ties_recipe("alice"), "mergebot/anonymous-merge")[1]["id"] == first["id"]
    assert bot.wait_done(first["id"])["status"] == "succeeded"

    other = ties_recipe("alice").replace("density: 0.5}", "density: 0.7}")
    sentence = refused(bot.submit(other, "mergebot/anonymous-merge"), 400, "target")
    assert "already exists and was not made by this request" in sentence
    refused(bot.submit(other, "mergebot/anonymous-private", private=True), 400, "private")

    # a Hub account named "anonymous" is not the anonymous requester
    cancel = f"/api/jobs/{first['id']}/cancel"
    assert "only (anonymous) can cancel" in refused(
        bot.call("POST", cancel, {}, "tok-anonymous"), 403
    )
    assert len(job_commits(sandbox.url, "mergebot/anonymous-merge", ALICE)) == 1


def test_not_yours_and_not_there_answer_alike(bot, sandbox):
    _, private = bot.submit(ties_recipe("alice"), "alice/secret", ALICE, private=True)
    _, public = bot.submit(ties_recipe("alice"), "alice/open", ALICE)
    nothing = refused(bot.call("POST", "/api/jobs/job-nothing/cancel", {}, BOB), 404)
    for token in (BOB, None):
        hidden = refused(bot.call("POST", f"/api/jobs/{private['id']}/cancel", {}, token), 404)
        assert hidden == nothing.replace("job-nothing", private["id"])
    assert "only alice can cancel" in refused(
        bot.call("POST", f"/api/jobs/{public['id']}/cancel", {}, BOB), 403
    )
    assert "sign in as alice" in refused(
        bot.call("POST", f"/api/jobs/{public['id']}/cancel", {}), 401
    )
    refused(bot.call("POST", "/api/follows/alice/secret/stop", {}, BOB), 404)
    assert bot.call("POST", f"/api/jobs/{private['id']}/cancel", {}, ALICE)[0] == 200
    for job in (private, public):
        bot.wait_done(job["id"])
    summaries = bot.call("GET", "/api/jobs", token=ALICE)[1]
    assert summaries and all("recipe" not in s and "card" not in s for s in summaries)


def test_a_private_source_leaves_nothing_in_the_shared_cache(bot, sandbox):
    status, job = bot.submit(ties_recipe("carol"), "carol/merged", CAROL, private=True)
    assert status == 202, job
    assert bot.wait_done(job["id"])["status"] == "succeeded"
    cached = [str(p) for p in bot.work.rglob("*") if "models--carol--" in str(p)]
    assert cached == []


def test_an_outage_is_ridden_out_then_retried_once_when_the_hub_is_back(llama_family, tmp_path):
    """A queued job meets a Hub that refuses connections: each retry is a line in its log, it
    fails naming the outage and the time waited, and runs again by itself when the Hub is back;
    meanwhile its requester still sees it, and a new request gets a 503."""
    from service_env import MergebotProcess, service_env

    sandbox = start_sandbox({"alice": llama_family})
    work = tmp_path / "work"
    serve, api = start_serve(
        sandbox.url,
        work,
        "--no-worker",
        MERGEBOT_HUB_PATIENCE_SECONDS="3",
        MERGEBOT_OUTAGE_CHECK_SECONDS="1",
        MERGEBOT_HUB_TIMEOUT_SECONDS="3",
    )
    worker = None
    try:
        status, job = api.submit(ties_recipe("alice"), "alice/outage", ALICE)
        assert status == 202, job
        sandbox.go_down()
        assert api.call("GET", f"/api/jobs/{job['id']}", token=ALICE)[0] == 200
        other = ties_recipe("alice").replace("density: 0.5}", "density: 0.6}")
        assert "not answering" in refused(api.submit(other, "alice/other", ALICE), 503)
        assert "could not reach the Hub" in refused(api.call("GET", "/api/jobs", token=BOB), 503)

        worker = MergebotProcess(
            ["worker", "--id", "outage-worker"],
            service_env(
                sandbox.url, work, MERGEBOT_HUB_PATIENCE_SECONDS="3", MERGEBOT_NAMESPACE="mergebot"
            ),
            tmp_path / "worker.log",
        )
        failed = api.wait_done(job["id"])
        assert failed["status"] == "failed", failed
        assert re.match(r"the Hub could not be reached for \d+ s \(ConnectError\)", failed["error"])
        assert (
            "during pre-flight; the job runs again by itself once the Hub answers"
            in failed["error"]
        )
        assert any(
            line.startswith("Hub unreachable (ConnectError), retrying in") for line in failed["log"]
        )

        sandbox.come_back()

        def succeeded() -> dict | None:
            seen = api.job(job["id"])
            return seen if seen["status"] == "succeeded" else None

        done = wait_until(succeeded, "the job to run again and succeed")
        assert done["attempt"] == 2 and done["auto_retried"]
        assert len(job_commits(sandbox.url, "alice/outage", ALICE, job["id"])) == 1
    finally:
        if worker:
            worker.stop()
        serve.stop()
        sandbox.__exit__()


def test_the_api_reference_reads_offline(bot):
    with urllib.request.urlopen(bot.url + "/api/docs", timeout=60) as response:
        page = response.read().decode()
    for call in ("POST</span> /api/jobs", "/api/jobs/{job_id}/cancel", "/api/webhooks/hub"):
        assert call in page
    assert "Validate a recipe against the Hub" in page and "413 a body over the size limit" in page
    assert not re.search(r"""(src|href)=["']?https?://""", page), (
        "the page loads nothing from outside"
    )


def test_a_merge_verified_while_a_search_loads_its_models_leaves_torch_in_float32(
    llama_family, tmp_path
):
    """The bot verifies a bfloat16 merge in one thread while a search loads float32 sources in
    another. transformers builds each model under torch's process-wide default dtype; built
    at once, each put the other's default back out of order and left the process in
    bfloat16 (a later merge failed: "expected m1 and m2 to have the same dtype")."""
    import torch
    from transformers import AutoModelForCausalLM

    from merge_engine.evolve.candidates import load_source
    from merge_engine.example import save_model
    from merge_engine.recipe.schema import ModelReference
    from service.verification.verify import verify_transformers

    base, _ = llama_family
    half = save_model(
        AutoModelForCausalLM.from_pretrained(base).to(torch.bfloat16), tmp_path / "half"
    )

    def verify_merges() -> None:
        for _ in range(25):
            verify_transformers(half, torch.device("cpu"))

    def load_sources() -> list[torch.dtype]:
        return [
            load_source(ModelReference(str(base)), torch.device("cpu")).module.dtype
            for _ in range(25)
        ]

    with ThreadPoolExecutor(2) as pool:
        verified, loaded = pool.submit(verify_merges), pool.submit(load_sources)
        verified.result()
        assert set(loaded.result()) == {torch.float32}
    assert torch.get_default_dtype() == torch.float32
