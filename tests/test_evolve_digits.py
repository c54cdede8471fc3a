"""The acceptance test on real tasks: two tiny Llamas fine-tuned in the test from one base,
one to copy digit strings and one to reverse them. A parameter search's merge does both
better than either source and than the uniform TIES merge on held-out strings; layer-path
searches over the same pair write models that plain transformers load and that compute what
was evaluated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from evolve_tasks import (
    TASKS,
    digit_rows,
    exact_match,
    load_digit_model,
    make_digit_family,
    write_jsonl,
)
from test_evolve import path_logits
from transformers import AutoModelForCausalLM

from merge_engine.evolve.search import evolve
from merge_engine.evolve.spec import spec_from_text

pytestmark = pytest.mark.slow
EXAMPLES = 64


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[dict[str, Path], str]:
    """The family and the fitness block: each task's search rows (dev strings) and held-out
    rows (test strings, never seen by the search or the training)."""
    folder = tmp_path_factory.mktemp("digits")
    family = make_digit_family(folder / "models", seed=0)
    tasks = []
    for task in TASKS:
        search = write_jsonl(folder / f"{task}-dev.jsonl", digit_rows(task, EXAMPLES, 0, "dev"))
        held = write_jsonl(folder / f"{task}-test.jsonl", digit_rows(task, EXAMPLES, 0, "test"))
        tasks.append(
            f"  - {{name: {task}, kind: exact_match, data: {{path: {search}}}, "
            f"held_out: {{path: {held}}}, max_new_tokens: 8, batch_size: 64}}"
        )
    return family, "fitness:\n" + "\n".join(tasks)


def held_out_accuracy(model: torch.nn.Module) -> float:
    rows = [row for task in TASKS for row in digit_rows(task, EXAMPLES, 0, "test")]
    return exact_match(model, rows)


def test_the_parameter_search_beats_each_source_and_uniform_ties(digits, tmp_path, one_thread):
    family, fitness = digits
    spec = spec_from_text(
        f"""
space: parameters
models: [{{model: {family["copy"]}}}, {{model: {family["reverse"]}}}]
base_model: {family["base"]}
parameters:
  method: ties
  search: {{weight: [0, 1], density: [0.1, 1]}}
  fixed: {{normalize: false}}
{fitness}
budget: {{trials: 40}}
"""
    )
    result = evolve(spec, tmp_path / "out", device="cpu", show_progress=False)

    written = load_digit_model(tmp_path / "out")
    winner = held_out_accuracy(written)  # scored here, independently of the search's evaluator
    assert winner == pytest.approx(result.held_out_fitness)
    sources = {name: held_out_accuracy(load_digit_model(family[name])) for name in TASKS}
    assert all(winner >= score + 0.2 for score in sources.values()), (winner, sources)
    uniform = next(b for b in result.baselines if b.label.startswith("uniform"))
    assert uniform.label == "uniform ties merge"
    assert winner >= uniform.held_out + 0.05, (winner, uniform)
    assert "| **this merge** |" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("space", ["layers", "both"])
def test_layer_searches_write_models_that_compute_what_was_evaluated(
    digits, tmp_path, space, one_thread
):
    family, fitness = digits
    spec = spec_from_text(
        f"""
space: {space}
models: [{{model: {family["copy"]}}}, {{model: {family["reverse"]}}}]
base_model: {family["base"]}
parameters: {{method: ties, fixed: {{normalize: false}}}}
layers: {{repeats: 2, max_length: 8}}
{fitness}
budget: {{trials: 8}}
"""
    )
    out = tmp_path / "out"
    result = evolve(spec, out, device="cpu", show_progress=False)

    assert result.logit_difference < 1e-5  # the written model is the evaluated candidate
    written = AutoModelForCausalLM.from_pretrained(out)
    models = {p.model: AutoModelForCausalLM.from_pretrained(p.model) for p in result.path}
    ids = torch.randint(3, 40, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = written(input_ids=ids).logits
        assert torch.allclose(logits, path_logits(models, result.path, ids), atol=1e-5)
        assert torch.allclose(
            logits, path_logits(models, result.path, ids, folded=False), atol=1e-3
        )
    assert held_out_accuracy(written) == pytest.approx(result.held_out_fitness)
