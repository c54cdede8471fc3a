"""Fitness from an lm-evaluation-harness task YAML over a local jsonl: it scores what the
built-in task scores on the same rows, a search runs on it, and a bad task file (or any lm-eval
task in a bot request) gets one sentence before anything is loaded."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SEARCH_TEXTS
from test_evolve_fitness import lm, tokenizer  # noqa: F401 (fixtures)

from merge_engine.errors import RecipeError
from merge_engine.evolve.checks import check_spec
from merge_engine.evolve.fitness import evaluate_task, read_task
from merge_engine.evolve.search import evolve
from merge_engine.evolve.spec import FitnessTask, spec_from_text

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest
CPU = torch.device("cpu")
PROMPTS = ["once upon a", "1, 2, 3,", "hello", "the cat sat", "abc", "x = y +"]

EXACT_MATCH_YAML = """\
task: digits_em
dataset_path: json
dataset_kwargs:
  data_files: {validation: rows.jsonl, test: rows.jsonl}
validation_split: validation
test_split: test
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 5}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]
"""
"""lm-eval's exact match over stripped texts, as the built-in compares them, on one file
read as both splits (the built-in task below scores the same rows on both too)."""


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def greedy_outputs(model, tok, prompts: list[str], new_tokens: int) -> list[str]:
    """transformers' own greedy ``generate``, one prompt at a time: the reference."""
    outputs = []
    for prompt in prompts:
        input_ids = torch.tensor([tok(prompt)["input_ids"]])
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            pad_token_id=tok.pad_token_id,
        )
        outputs.append(tok.decode(generated[0, input_ids.shape[1] :], skip_special_tokens=True))
    return outputs


def write_task(folder: Path, rows: list[dict], yaml_text: str = EXACT_MATCH_YAML) -> Path:
    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = folder / "task.yaml"
    path.write_text(yaml_text)
    return path


def lm_eval_task(path: Path, **options) -> FitnessTask:
    return FitnessTask.model_validate({"kind": "lm_eval", "task": str(path), **options})


def test_an_lm_eval_exact_match_task_scores_what_the_built_in_scores(lm, tokenizer, tmp_path):  # noqa: F811
    outputs = greedy_outputs(lm, tokenizer, PROMPTS, 5)
    answers = [  # right, right with spaces around it, wrong: 4 of 6 right
        outputs[0],
        f"  {outputs[1]} \n",
        outputs[2] + " and more",
        outputs[3],
        "no such output",
        outputs[5],
    ]
    rows = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, answers, strict=True)]
    path = write_task(tmp_path, rows)
    built_in = FitnessTask.model_validate(
        {
            "kind": "exact_match",
            "data": {"path": str(tmp_path / "rows.jsonl")},
            "held_out": {"path": str(tmp_path / "rows.jsonl")},
            "max_new_tokens": 5,
            "batch_size": 4,
        }
    )
    harness = lm_eval_task(path, name="digits", batch_size=4)
    for split in ("search", "held_out"):
        expected = evaluate_task(lm, tokenizer, read_task(built_in, "fitness[0]"), split, CPU)
        score = evaluate_task(lm, tokenizer, read_task(harness, "fitness[1]"), split, CPU)
        assert expected.value == pytest.approx(4 / 6)
        assert (score.task, score.metric, score.value) == ("digits", "exact_match", expected.value)
        assert score.fitness == expected.fitness


def test_loglikelihood_is_the_continuations_summed_log_probability(lm, tokenizer, tmp_path):  # noqa: F811
    """A multiple-choice lm-eval task asks ``loglikelihood``: its choice is the one whose
    tokens, after the prompt, the model finds most likely (computed here by hand)."""
    prompts = ["the cat", "one two", "hello"]
    choices = [" sat", " three", " world"]

    def summed(prompt: str, choice: str) -> float:
        context = tokenizer(prompt)["input_ids"]
        ids = torch.tensor([context + tokenizer(choice, add_special_tokens=False)["input_ids"]])
        logprobs = torch.log_softmax(lm(input_ids=ids).logits[0, :-1].float(), -1)
        return sum(logprobs[t - 1, ids[0, t]].item() for t in range(len(context), ids.shape[1]))

    with torch.no_grad():
        best = [max(range(3), key=lambda c, p=p: summed(p, choices[c])) for p in prompts]
    rows = [{"prompt": p, "choices": choices, "gold": 0} for p in prompts]
    path = write_task(
        tmp_path,
        rows,
        EXACT_MATCH_YAML.replace("generate_until", "multiple_choice")
        .replace('doc_to_target: "{{answer}}"', "doc_to_target: gold\ndoc_to_choice: choices")
        .split("generation_kwargs")[0]
        + "metric_list: [{metric: acc}]\n",
    )
    score = evaluate_task(lm, tokenizer, read_task(lm_eval_task(path), "fitness[0]"), "search", CPU)
    assert score.metric == "acc"
    assert score.value == pytest.approx(sum(b == 0 for b in best) / 3)


@pytest.mark.parametrize(
    ("yaml_text", "words"),
    [
        (
            EXACT_MATCH_YAML + "process_docs: !function utils.process_docs\n",
            "uses the tag '!function' at line 16, which imports Python code",
        ),
        ("include: base.yaml\n" + EXACT_MATCH_YAML, "has 'include', which includes another file"),
        ("class: !!python/name:os.system\n", "uses the tag"),
        (
            EXACT_MATCH_YAML.replace("data_files:", "trust_remote_code: true\n  data_files:"),
            "asks for trust_remote_code",
        ),
        ("- a list\n", "is not a task mapping with a 'task' name"),
    ],
)
def test_a_task_file_that_imports_code_is_refused_in_one_sentence(tmp_path, yaml_text, words):
    path = write_task(tmp_path, [], yaml_text)
    with pytest.raises(RecipeError) as error:
        read_task(lm_eval_task(path), "fitness[0]")
    assert words in str(error.value)
    assert error.value.field == "fitness[0].task"
    assert "\n" not in str(error.value)


def test_a_missing_task_file_and_a_wrong_metric_get_one_sentence(lm, tokenizer, tmp_path):  # noqa: F811
    with pytest.raises(RecipeError, match=r"lm-eval task file '.*nowhere.yaml' does not exist"):
        read_task(lm_eval_task(tmp_path / "nowhere.yaml"), "fitness[0]")
    path = write_task(tmp_path, [{"prompt": "a", "answer": "b"}] * 2)
    with pytest.raises(RecipeError, match=r"has no metric 'bleu' \(it has exact_match\)"):
        read_task(lm_eval_task(path, metric="bleu"), "fitness[0]")


def test_the_engine_and_the_bot_do_not_import_lm_eval_until_a_task_asks():
    code = (
        "import sys, merge_engine.cli, merge_engine.evolve.search, service.intake.request\n"
        "assert 'lm_eval' not in sys.modules, 'lm-eval imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_without_the_extra_an_lm_eval_task_names_it(tmp_path, monkeypatch):
    for name in [name for name in sys.modules if name.split(".")[0] == "lm_eval"] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if lm-eval were not installed
    path = write_task(tmp_path, [{"prompt": "a", "answer": "b"}] * 2)
    with pytest.raises(RecipeError) as error:
        read_task(lm_eval_task(path), "fitness[0]")
    assert str(error.value) == (
        "fitness: an lm_eval fitness task needs the lm-eval extra; "
        "install it with pip install 'mergebot[lm-eval]'"
    )


def test_the_spec_refuses_a_bad_lm_eval_task_before_any_model_is_read(tmp_path):
    """The models named do not exist: the task file's refusal comes first."""
    spec = spec_from_text(
        f"""
space: parameters
models: [{{model: {tmp_path / "absent-a"}}}, {{model: {tmp_path / "absent-b"}}}]
fitness: [{{kind: lm_eval, task: {tmp_path / "missing.yaml"}}}]
budget: {{trials: 2}}
"""
    )
    with pytest.raises(RecipeError, match=r"lm-eval task file .* does not exist") as error:
        check_spec(spec)
    assert error.value.field == "fitness[0].task"
    for task, words in [
        ("{kind: lm_eval}", "fitness[0]: an lm_eval task needs 'task'"),
        ("{kind: lm_eval, task: t.yaml, data: {examples: [a]}}", "remove 'data'"),
        ("{kind: nll, task: t.yaml, data: {examples: [a]}}", "'task' belongs to lm_eval tasks"),
    ]:
        with pytest.raises(RecipeError, match=re.escape(words)):
            spec_from_text(
                spec.to_yaml().split("fitness:")[0] + f"fitness: [{task}]\nbudget: {{trials: 2}}"
            )


@pytest.mark.slow
def test_a_search_with_an_lm_eval_fitness_runs_and_reports_its_metric(scored_family, tmp_path):
    base, tuned = scored_family
    rows = [{"text": text} for text in SEARCH_TEXTS * 2]
    path = write_task(
        tmp_path,
        rows,
        """\
task: texts
dataset_path: json
dataset_kwargs: {data_files: {test: rows.jsonl}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}]
""",
    )
    spec = spec_from_text(
        f"""
space: parameters
models: [{{model: {tuned[0]}}}, {{model: {tuned[1]}}}]
base_model: {base}
fitness: [{{kind: lm_eval, name: texts, task: {path}}}]
budget: {{trials: 3, population: 4}}
"""
    )
    result = evolve(spec, tmp_path / "out", device="cpu", show_progress=False)
    assert len(result.records) == 3
    assert all(r.scores["texts"] > 1 for r in result.records)  # a perplexity
    best = max(r.fitness for r in result.records)
    assert result.search_fitness == pytest.approx(best)
    assert best == pytest.approx(-min(r.scores["texts"] for r in result.records))
