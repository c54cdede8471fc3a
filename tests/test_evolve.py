"""``mergebot evolve``: the search finds what it should, writes a winner that ``mergebot merge``
and plain transformers reproduce, survives a kill, shares a study between processes, and
refuses bad specs in one sentence before writing anything."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import SEARCH_TEXTS, load_weights
from optuna.trial import TrialState
from postgres_server import postgres_url
from service_env import wait_until
from transformers import AutoModelForCausalLM, AutoTokenizer

from merge_engine import cli, merge_models, parse_recipe
from merge_engine.evolve.candidates import ParameterCandidate, load_source, output_dtype
from merge_engine.evolve.fitness import evaluate, read_tasks
from merge_engine.evolve.genome import Gene
from merge_engine.evolve.report import TrialRecord
from merge_engine.evolve.search import evolve
from merge_engine.evolve.spec import spec_from_text
from merge_engine.evolve.study import Outcome, Stage, open_storage, open_study, records_of
from merge_engine.example import make_family
from merge_engine.methods.task_vector_sum import compiled_entries
from merge_engine.recipe.schema import ModelReference


def nll_spec(base: Path, tuned: list[Path], trials: int, extra: str = "") -> str:
    examples = json.dumps(SEARCH_TEXTS * 4)
    return f"""
space: parameters
models: [{{model: {tuned[0]}}}, {{model: {tuned[1]}}}]
base_model: {base}
fitness:
  - kind: nll
    data: {{examples: {examples}}}
budget: {{trials: {trials}, population: 4}}
{extra}
"""


def read_trials(out: Path) -> list[dict]:
    lines = (out / "evolve" / "trials.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# --- the search finds a planted optimum ---------------------------------------------------

TARGET = {0: [0.3, 0.8], 1: [0.6, 0.2]}
"""Per model, the weight of its task vector in layers 0-1 and in layers 2-3."""


def test_planted_optimum_is_found_and_reproduced_bit_for_bit(scored_family, tmp_path, one_thread):
    base, tuned = scored_family
    weights = {"base": load_weights(base), 0: load_weights(tuned[0]), 1: load_weights(tuned[1])}

    def weight(model: int, name: str) -> float:
        layer = re.search(r"layers\.(\d+)\.", name)
        if layer:
            return TARGET[model][int(layer[1]) // 2]
        return TARGET[model][0 if "embed" in name else -1]  # as mergekit: nearest layer's value

    target = {
        name: b + sum(weight(m, name) * (weights[m][name] - b) for m in (0, 1))
        for name, b in weights["base"].items()
    }

    def closeness(model: torch.nn.Module, split: str) -> float:
        state = model.state_dict()
        return -sum(float(((state[n] - t) ** 2).sum()) for n, t in target.items())

    spec = spec_from_text(
        f"""
space: parameters
models: [{{model: {tuned[0]}}}, {{model: {tuned[1]}}}]
base_model: {base}
parameters: {{method: task_arithmetic, search: {{weight: [0, 1]}}, layers_per_value: 2}}
budget: {{trials: 100, population: 8}}
seed: 1
"""
    )
    result = evolve(spec, tmp_path / "out", fitness=closeness, device="cpu", show_progress=False)

    found = {m: result.recipe.models[m].parameters["weight"] for m in (0, 1)}  # one value per layer
    for m in (0, 1):
        assert found[m][:2] == [found[m][0]] * 2 and found[m][2:] == [found[m][2]] * 2
        assert found[m][0] == pytest.approx(TARGET[m][0], abs=0.1)
        assert found[m][2] == pytest.approx(TARGET[m][1], abs=0.1)
    assert len(read_trials(tmp_path / "out")) == 100
    assert result.search_fitness > max(b.search for b in result.baselines)

    # The written model is what `mergebot merge` makes of the written recipe, bit for bit.
    assert (
        cli.main(
            [
                "merge",
                str(tmp_path / "out" / "mergebot_recipe.yaml"),
                str(tmp_path / "again"),
                "--quiet",
            ]
        )
        == 0
    )
    written, again = load_weights(tmp_path / "out"), load_weights(tmp_path / "again")
    assert written.keys() == again.keys()
    assert all(torch.equal(written[n], again[n]) for n in written)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Evolutionary search" in card and "evolve/fitness.png" in card
    assert (tmp_path / "out" / "evolve" / "fitness.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_ties_candidate_pruned_from_its_kept_order_equals_a_fresh_merge(scored_family, compiled):
    """Candidates reuse each task vector's magnitude order from one trial to the next, and
    (``compiled``, as for a large model) run their kernels compiled; every candidate still
    equals the merge of its recipe made from scratch, bit for bit, on the search's 4-decimal
    densities and on any other density."""
    base, tuned = scored_family
    refs = [ModelReference(str(path)) for path in (base, *tuned)]
    loaded = {ref: load_source(ref, torch.device("cpu"), None, False, None) for ref in refs}

    def recipe(densities: tuple[float, float]):
        return parse_recipe(
            {
                "merge_method": "ties",
                "base_model": str(base),
                "models": [
                    {"model": str(path), "parameters": {"weight": 0.7, "density": d}}
                    for path, d in zip(tuned, densities, strict=True)
                ],
            }
        )

    first = recipe((0.3, 0.7))
    candidate = ParameterCandidate(
        loaded, first.donor(), output_dtype(first, loaded), torch.device("cpu"), compiled
    )
    for densities in [(0.3, 0.7), (0.7, 0.3), (0.1234, 0.9999), (1 / 3, 0.45), (1.0, 0.5)]:
        built = candidate.build(recipe(densities)).state_dict()
        fresh = merge_models(
            [tuned[0], tuned[1]],
            "ties",
            base=base,
            model_parameters=[{"weight": 0.7, "density": d} for d in densities],
        )
        assert all(torch.equal(built[name], fresh[name]) for name in fresh), densities
    assert not (compiled and compiled_entries().failed), "torch.compile fell back to eager"


def test_a_serial_search_with_a_seed_proposes_the_same_candidates(
    scored_family, tmp_path, one_thread
):
    base, tuned = scored_family
    spec = spec_from_text(nll_spec(base, tuned, trials=8))
    for out in ("first", "second"):
        evolve(spec, tmp_path / out, device="cpu", show_progress=False)
    first, second = read_trials(tmp_path / "first"), read_trials(tmp_path / "second")
    assert [t["params"] for t in first] == [t["params"] for t in second]
    assert len({json.dumps(t["params"]) for t in first}) == 8


# --- layer paths: the written model is the evaluated path ---------------------------------


def path_logits(
    sources: dict[str, torch.nn.Module], path: list, ids: torch.Tensor, folded: bool = True
) -> torch.Tensor:
    """The path computed by hand from the source models: the first slot's embeddings, each
    slot's layer, the last slot's norm and head. ``folded``: each layer with its o_proj and
    down_proj weights multiplied by 1/(s_1···s_k), as the written model holds them; else the
    paper's way, each layer's input multiplied by its scale."""
    from torch.func import functional_call

    first, last = sources[path[0].model].model, sources[path[-1].model]
    hidden = first.embed_tokens(ids)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    rotary = first.rotary_emb(hidden, positions)
    factor = 1.0
    for k, slot in enumerate(path):
        layer = sources[slot.model].model.layers[slot.layer]
        factor = factor / slot.scale if k else factor
        weights = dict(layer.named_parameters())
        if folded:
            for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
                weights[name] = weights[name] * factor
        inputs = hidden if folded else hidden * slot.scale
        hidden = functional_call(
            layer,
            weights,
            (inputs,),
            {"attention_mask": None, "position_embeddings": rotary, "position_ids": positions},
        )
    return last.lm_head(last.model.norm(hidden))


@pytest.mark.parametrize("space", ["layers", "both"])
def test_a_layer_path_is_written_as_slices_that_plain_transformers_load(
    scored_family, tmp_path, space, one_thread
):
    base, tuned = scored_family
    ids = torch.randint(3, 70, (3, 10), generator=torch.Generator().manual_seed(0))

    def spread(model: torch.nn.Module, split: str) -> float:
        return -float(model(input_ids=ids).logits.std())

    spec = spec_from_text(
        f"""
space: {space}
models: [{{model: {tuned[0]}}}, {{model: {tuned[1]}}}]
base_model: {base}
layers: {{repeats: 2, max_length: 6, scale_bounds: [0.5, 1.5]}}
budget: {{trials: 10}}
"""
    )
    out = tmp_path / "out"
    result = evolve(spec, out, fitness=spread, device="cpu", show_progress=False)

    assert result.recipe.merge_method == "passthrough" and result.recipe.slices
    assert len(result.path) == len(result.recipe.slices) <= 6
    written = AutoModelForCausalLM.from_pretrained(out)
    assert written.config.num_hidden_layers == len(result.path)
    models = {str(ref): AutoModelForCausalLM.from_pretrained(ref) for ref in tuned}
    starts = [models[str(ref)] for ref in tuned]
    if space == "both":
        merge = out / "evolve" / "parameters-merge"
        models[str(merge.resolve())] = AutoModelForCausalLM.from_pretrained(merge)
        starts.insert(0, models[str(merge.resolve())])
    # the path stage's first trials are its sources' own paths (the parameter stage's winner first)
    first_paths = [r.fitness for r in result.records if r.stage == "layers"][: len(starts)]
    with torch.no_grad():
        assert first_paths == pytest.approx([spread(m, "search") for m in starts], abs=1e-5)
    with torch.no_grad():
        logits = written(input_ids=ids).logits
        assert torch.allclose(logits, path_logits(models, result.path, ids), atol=1e-5)
        # and the paper's definition, up to RMSNorm's eps (docs/evolve.md)
        assert torch.allclose(
            logits, path_logits(models, result.path, ids, folded=False), atol=1e-3
        )
    assert result.logit_difference < 1e-5  # the written model is the evaluated candidate
    assert (out / "evolve" / "path.png").is_file()


def test_a_layer_path_search_starts_from_every_source_and_never_ends_below_one(
    scored_family, tmp_path, one_thread
):
    """The second source is the best model there is on this fitness (closeness to its own
    logits); its own path is in the space, so the search reaches it in its first generation."""
    base, tuned = scored_family
    ids = torch.randint(3, 70, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wanted = AutoModelForCausalLM.from_pretrained(tuned[1])(input_ids=ids).logits

    def closeness(model: torch.nn.Module, split: str) -> float:
        return -float((model(input_ids=ids).logits - wanted).abs().max())

    spec = spec_from_text(
        f"""
space: layers
models: [{{model: {tuned[0]}}}, {{model: {tuned[1]}}}]
layers: {{repeats: 2}}
budget: {{trials: 4, population: 4}}
"""
    )
    result = evolve(spec, tmp_path / "out", fitness=closeness, device="cpu", show_progress=False)

    first, second = result.baselines[:2]  # the sources, in the spec's order
    assert first.search < second.search == pytest.approx(0.0, abs=1e-5)
    assert result.search_fitness >= second.search - 1e-5
    assert [slot.layer for slot in result.path] == [0, 1, 2, 3]
    assert len({slot.model for slot in result.path}) == 1
    assert tuned[1].name in result.path[0].model


def test_trials_jsonl_grows_in_place_so_tail_f_follows_a_running_search(scored_family, tmp_path):
    """After each trial the search adds its new line to trials.jsonl instead of writing every
    trial again into a new file (at 200 trials of 5,000 genes that was 2.4 s a trial), so
    ``tail -f`` keeps following it; the finished search leaves one line per trial."""
    base, tuned = scored_family
    trials_file = tmp_path / "out" / "evolve" / "trials.jsonl"
    seen: list[tuple[int, int]] = []  # (inode, lines) after each trial

    def progress(stage: str, done: int, budget: int, best: float) -> None:
        seen.append((trials_file.stat().st_ino, len(trials_file.read_text().splitlines())))

    spec = spec_from_text(nll_spec(base, tuned, trials=5))
    evolve(spec, tmp_path / "out", device="cpu", show_progress=False, progress=progress)

    assert [lines for _, lines in seen] == [1, 2, 3, 4, 5]
    assert len({inode for inode, _ in seen}) == 1
    assert [t["number"] for t in read_trials(tmp_path / "out")] == [0, 1, 2, 3, 4]


# --- a killed search resumes; two processes share a study ---------------------------------


def evolve_command(spec: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "merge_engine.cli",
        "evolve",
        str(spec),
        str(out),
        "--device",
        "cpu",
        "--quiet",
        *extra,
    ]


def killed_after(spec: Path, out: Path, trials: int) -> list[dict]:
    """Run ``mergebot evolve spec out`` until ``trials`` trials are done, kill it with SIGKILL
    and return the trials it left in trials.jsonl."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(evolve_command(spec, out), env=env)
    trials_file = out / "evolve" / "trials.jsonl"
    wait_until(
        lambda: trials_file.is_file() and len(trials_file.read_text().splitlines()) >= trials,
        f"{trials} finished trials",
    )
    process.send_signal(signal.SIGKILL)
    process.wait()
    return read_trials(out)


def completed_trials(storage: str, spec_text: str) -> list[TrialRecord]:
    import optuna

    name = f"evolve-{spec_from_text(spec_text).fingerprint()}-parameters"
    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    return records_of(study, "parameters")


@pytest.mark.slow
def test_a_killed_search_resumes_without_evaluating_a_finished_trial_again(scored_family, tmp_path):
    base, tuned = scored_family
    text = nll_spec(base, tuned, trials=14)
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    out = tmp_path / "out"
    before = {t["number"]: t for t in killed_after(spec, out, 4)}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert not (out / "model.safetensors").exists()

    subprocess.run(evolve_command(spec, out, "--resume"), env=env, check=True, timeout=600)

    after = read_trials(out)
    assert len(after) == 14 and len({t["number"] for t in after}) == 14
    for number, trial in before.items():  # still there, evaluated once, by the killed process
        again = next(t for t in after if t["number"] == number)
        assert again["worker"] == trial["worker"] and again["fitness"] == trial["fitness"]
    assert {t["worker"] for t in after} - {t["worker"] for t in before.values()}  # the resumed run
    trials = completed_trials(f"sqlite:///{out / 'evolve' / 'study.db'}", text)
    assert len(trials) == 14
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_ctrl_c_leaves_a_study_that_resume_finishes(scored_family, tmp_path):
    base, tuned = scored_family
    spec = tmp_path / "spec.yaml"
    # A trial takes some 50 ms here: 400 are still running when the first one's line is seen
    spec.write_text(nll_spec(base, tuned, trials=400))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(evolve_command(spec, out), env=env, stderr=subprocess.PIPE, text=True)
    trials_file = out / "evolve" / "trials.jsonl"
    wait_until(
        lambda: trials_file.is_file() and trials_file.read_text().strip(), "a finished trial"
    )
    run.send_signal(signal.SIGINT)
    stderr = run.communicate(timeout=120)[1]
    assert run.returncode == 130
    assert f"continue with mergebot evolve {spec} {out} --resume" in stderr
    assert "Traceback" not in stderr
    subprocess.run(evolve_command(spec, out, "--resume"), env=env, check=True, timeout=600)
    numbers = [t["number"] for t in read_trials(out)]  # the interrupted trial is not among them
    assert len(numbers) == len(set(numbers)) == 400


@pytest.mark.slow
def test_two_processes_share_one_postgres_study(scored_family, tmp_path):
    base, tuned = scored_family
    text = nll_spec(base, tuned, trials=24)
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with postgres_url() as database:
        runs = [
            subprocess.Popen(
                evolve_command(spec, tmp_path / f"out{i}", "--storage", database),
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in (1, 2)
        ]
        outputs = [run.communicate(timeout=600)[0] for run in runs]
        assert [run.returncode for run in runs] == [0, 0]
        trials = completed_trials(database, text)
    assert len(trials) == 24
    assert len({t.number for t in trials}) == 24
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 24  # none twice
    workers = {t.worker for t in trials}
    assert len(workers) == 2, "both processes evaluated trials"
    best = [re.search(r"best of (\d+) trials: search fitness (\S+),", o).groups() for o in outputs]
    assert best[0] == best[1] == ("24", best[0][1])
    recipes = [(tmp_path / f"out{i}" / "mergebot_recipe.yaml").read_text() for i in (1, 2)]
    assert recipes[0] == recipes[1]


@pytest.mark.slow
def test_workers_on_one_machine_share_the_budget(scored_family, tmp_path):
    base, tuned = scored_family
    spec = tmp_path / "spec.yaml"
    # A budget long enough (300 trials of about 0.1 s) that the second process, which first
    # imports torch and loads the models, arrives before the first has used it: 60 trials
    # were done before it came, once a trial's bookkeeping stopped re-reading every trial.
    longer = json.dumps([" ".join(SEARCH_TEXTS)] * 96)
    spec.write_text(nll_spec(base, tuned, trials=300).replace(json.dumps(SEARCH_TEXTS * 4), longer))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(evolve_command(spec, out, "--workers", "2"), env=env, check=True, timeout=600)
    trials = read_trials(out)
    assert sorted(t["number"] for t in trials) == list(range(300))
    assert len({t["worker"] for t in trials}) == 2, "both processes evaluated trials"
    assert (out / "model.safetensors").is_file()


def test_a_search_beside_its_workers_takes_its_share_of_the_cores(scored_family, tmp_path):
    """The parent of --workers 2 runs its trials on half the cores, as each worker does (it
    used to keep torch's one thread per core beside them), and gives its setting back."""
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("one core: every process has one thread anyway")
    base, tuned = scored_family
    seen: list[int] = []
    own = torch.get_num_threads()
    torch.set_num_threads(cores)  # torch's default on a machine of its own
    try:
        evolve(
            spec_from_text(nll_spec(base, tuned, trials=4)),
            tmp_path / "out",
            workers=2,
            device="cpu",
            show_progress=False,
            progress=lambda *_: seen.append(torch.get_num_threads()),
        )
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(own)
    assert seen and set(seen) == {cores // 2}
    assert after == cores


# --- bad input: one sentence, nothing written ---------------------------------------------


def refused(tmp_path: Path, capsys, text: str) -> str:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    out = tmp_path / "out"
    assert cli.main(["evolve", str(spec), str(out), "--device", "cpu", "--quiet"]) == 1
    assert not out.exists(), "nothing is written for a refused spec"
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0
    return message.removeprefix("error: ")


def test_bad_specs_are_refused_in_one_sentence_before_anything_is_written(
    scored_family, gpt2_family, tmp_path, capsys
):
    base, tuned = scored_family
    wider = make_family(tmp_path / "wider", finetunes=1, hidden_size=48)[1][0]
    capsys.readouterr()
    good = nll_spec(base, tuned, trials=4)
    cases = [
        (
            good.replace("kind: nll", "kind: bleu"),
            "fitness[0].kind: must be 'multiple_choice', 'exact_match', 'nll', 'classification' or 'lm_eval', got 'bleu'",
        ),
        (
            good.replace(json.dumps(SEARCH_TEXTS * 4), "[]"),
            "fitness[0].data: 'examples' is empty; give at least one example",
        ),
        (good.replace("trials: 4", "trials: 0"), "budget.trials: must be greater than 0, got 0"),
        (
            good.replace("kind: nll", "kind: exact_match"),
            "fitness[0].answer_field: example 1 of fitness[0].data has no field 'answer' (it has prompt)",
        ),
        (
            good + "parameters: {method: ties, search: {density: [0.1, 1.5]}}\n",
            "parameters.search.density: bound 1.5 is outside density's range (0, 1]",
        ),
        (
            good + "parameters: {method: ties, filters: [mlp, nomatch]}\n",
            "parameters.filters[1]: 'nomatch' matches no tensor",
        ),
        (
            good.replace("space: parameters", "space: layers")
            .replace(str(tuned[0]), str(gpt2_family[1][0]))
            .replace(str(tuned[1]), str(gpt2_family[1][1])),
            "models[0].model:",
        ),
        (
            good.replace(str(tuned[1]), str(wider)),
            "has shape [96, 48], but [96, 32]",
        ),
    ]
    for text, expected in cases:
        assert expected in refused(tmp_path, capsys, text)


@pytest.mark.slow  # waits out Optuna's grace period for a dead process's trial (20 s)
def test_a_trial_left_without_a_heartbeat_is_failed_and_its_slot_run_again(tmp_path):
    """A process killed while the sampler proposed its candidate leaves a running trial that
    never had a heartbeat; the budget must still be completed, not wait for it for ever."""

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    genes = [Gene("x", 0.0, 1.0)]
    study = open_study(
        storage, "orphans", seed=0, population=None, starts=[{"x": 0.5}], genes=genes
    )
    orphan = study.ask()  # created, and its process "dies" before any heartbeat
    stage = Stage(study, "orphans", genes, budget=3)
    finished = threading.Event()

    def run() -> None:
        stage.run(lambda values: Outcome(-values["x"], {}, 0.0))
        finished.set()

    threading.Thread(target=run, daemon=True).start()
    assert finished.wait(timeout=180), "the search waited for the orphaned trial"
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[orphan.number] == TrialState.FAIL
    assert list(states.values()).count(TrialState.COMPLETE) == 3


# --- the paper's data-flow space at its real size ------------------------------------------


@pytest.fixture(scope="module")
def deep_pair(tmp_path_factory) -> list[Path]:
    """Two 32-layer Llamas of tiny width (the paper's sources are 2 x 32 layers), with the
    tiny tokenizer: a layer path over them, repeated 3 times, has 192 slots and 4,096 scales."""
    from merge_engine.example import save_tiny_tokenizer

    _, tuned = make_family(
        tmp_path_factory.mktemp("deep"),
        num_hidden_layers=32,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        scale=0.05,
        initializer_range=0.2,
    )
    for folder in tuned:
        save_tiny_tokenizer(folder)
    return tuned


@pytest.mark.slow
def test_the_papers_data_flow_space_runs_resumes_and_writes_what_it_evaluated(deep_pair, tmp_path):
    examples = json.dumps(SEARCH_TEXTS * 2)
    text = f"""
space: layers
models: [{{model: {deep_pair[0]}}}, {{model: {deep_pair[1]}}}]
layers: {{repeats: 3}}
fitness:
  - kind: nll
    data: {{examples: {examples}}}
budget: {{trials: 24, population: 8}}
"""
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(text)
    out = tmp_path / "out"
    before = len(killed_after(spec_path, out, 10))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    subprocess.run(evolve_command(spec_path, out, "--resume"), env=env, check=True, timeout=900)

    trials = read_trials(out)
    assert len(trials) == 24 and len({t["number"] for t in trials}) == 24
    assert len(trials[0]["params"]) == 3 * 64 + 64 * 64  # the genome at the paper's size
    assert before >= 10
    written = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    # The written model scores what the best trial scored: it is the evaluated candidate.
    rows = read_tasks(spec_from_text(text).fitness, None, False, None)
    tokenizer = AutoTokenizer.from_pretrained(deep_pair[0])
    total = evaluate(written, tokenizer, rows, "search", torch.device("cpu")).total
    assert total == pytest.approx(max(t["fitness"] for t in trials), abs=1e-4)
