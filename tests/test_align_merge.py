"""A recipe's align step: ``mergebot merge`` of two tiny Llamas whose hidden units are in
different orders (one a permuted, perturbed copy of the other, as two trainings from different
initialisations would leave them) recovers the permutation, merges the aligned models, saves
the permutations and documents them; bad align blocks are refused at pre-flight."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from merge_engine import load_recipe, merge, preflight
from merge_engine.align import (
    apply_permutation,
    invert,
    load_permutations,
    random_permutations,
    transformer_spec,
)
from merge_engine.errors import IncompatibleModelsError, RecipeError
from merge_engine.example import save_tiny_tokenizer, tiny_config
from tests.conftest import load_weights, write_recipe


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    """Model A; model B = A with every MLP unit and head group reordered, plus small noise."""
    root = tmp_path_factory.mktemp("align")
    torch.manual_seed(11)
    config = tiny_config("llama", num_attention_heads=4, num_key_value_heads=2)
    a = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norms too, so that every tensor matters
        for name, p in a.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    state = {k: v.detach().clone() for k, v in a.state_dict().items()}
    spec = transformer_spec(config, {k: tuple(v.shape) for k, v in state.items()})
    perms = random_permutations(spec, seed=3)
    g = torch.Generator().manual_seed(5)
    permuted = apply_permutation(state, spec, perms)
    b = AutoModelForCausalLM.from_config(config)
    b.load_state_dict(
        {k: v + 0.0005 * torch.randn(v.shape, generator=g) for k, v in permuted.items()}
    )
    folders = {}
    for name, model in (("a", a), ("b", b)):
        folders[name] = root / name
        model.save_pretrained(folders[name])
        save_tiny_tokenizer(folders[name])
    return {"root": root, "spec": spec, "perms": perms, "state": state, **folders}


def logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder)(ids).logits


LINEAR = """merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
dtype: float32
"""


@pytest.mark.slow
def test_mergebot_merge_aligns_then_merges_and_saves_the_permutations(pair):
    root, a, b = pair["root"], pair["a"], pair["b"]
    recipe = write_recipe(root, LINEAR.format(a=a, b=b) + "align: {method: weight_matching}\n")
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "merge", str(recipe), str(root / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    out = root / "out"

    # the permutation that undoes B's reordering, found from the weights alone
    files = list((out / "alignment").iterdir())
    assert [f.name for f in files] == [f"{str(b).strip('/').replace('/', '_')}.json"]
    found = load_permutations(files[0], pair["spec"])
    expected = invert(pair["perms"])
    assert all(torch.equal(found[g], expected[g]) for g in expected)

    # merged = the average of A and B put back in A's order (by the known permutation)
    b_state = load_weights(b)
    realigned = apply_permutation(b_state, pair["spec"], expected)
    merged = load_weights(out)
    for name, tensor in pair["state"].items():
        torch.testing.assert_close(merged[name], (tensor + realigned[name]) / 2)

    ids = torch.tensor([[3, 9, 27, 4, 15, 8]])
    reference = logits(a, ids)
    aligned_gap = (logits(out, ids) - reference).abs().max()
    write_recipe(root, LINEAR.format(a=a, b=b))
    naive = merge(preflight(load_recipe(recipe)), root / "naive", show_progress=False)
    naive_gap = (logits(naive, ids) - reference).abs().max()
    assert aligned_gap < 0.25 * naive_gap, (aligned_gap, naive_gap)

    card = (out / "README.md").read_text()
    assert "## Alignment" in card and "weight_matching" in card
    assert f"`alignment/{files[0].name}`" in card and "converged" in card
    pinned = (out / "mergebot_recipe.yaml").read_text()
    assert "align: {}" in pinned  # the defaults: weight matching to the first model


@pytest.mark.slow
def test_activation_matching_on_calibration_text_finds_the_same_permutation(pair, tmp_path):
    text = LINEAR.format(a=pair["a"], b=pair["b"])
    examples = json.dumps(["the quick brown fox", "1 + 2 = 3", "def f(x): return x"])
    text += f"align: {{method: activation_matching}}\ncalibration: {{examples: {examples}}}\n"
    plan = preflight(load_recipe(write_recipe(tmp_path, text)))
    assert plan.notes == []
    out = merge(plan, tmp_path / "out", show_progress=False)
    found = load_permutations(next((out / "alignment").iterdir()), pair["spec"])
    expected = invert(pair["perms"])
    assert all(torch.equal(found[g], expected[g]) for g in expected)
    assert "activation_matching" in (out / "README.md").read_text()


def test_bad_align_blocks_are_refused_before_anything_is_read(pair, tmp_path):
    base = LINEAR.format(a=pair["a"], b=pair["b"])

    def refused(extra: str, error=RecipeError, text: str = base) -> str:
        with pytest.raises(error) as caught:
            preflight(load_recipe(write_recipe(tmp_path, text + extra)))
        return str(caught.value)

    assert "remove repair" in refused("align: {repair: true}\n")
    assert "is not one of the models merged" in refused("align: {reference: org/other}\n")
    assert "add a calibration block" in refused("align: {method: activation_matching}\n")
    assert "unknown" not in refused("align: {method: sinkhorn}\n")
    regmean = base.replace("linear", "regmean").replace("parameters: {weight: 0.5}", "")
    message = refused("align: {}\ncalibration: {examples: [abc]}\n", text=regmean)
    assert "use align with a data-free method" in message

    other = tmp_path / "olmo"
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "olmo"}))
    message = refused("align: {}\n", IncompatibleModelsError, LINEAR.format(a=other, b=pair["b"]))
    assert "model_type 'olmo' has no permutation spec; alignment covers" in message
