"""Merging with data from a recipe: ``mergebot merge`` with calibration files on tiny Llamas,
checked against Gram matrices and Fisher diagonals computed here by hand; the statistics
reused by a second merge; the card; and every bad calibration input as one sentence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from merge_engine import load_recipe, merge, preflight
from merge_engine.errors import IncompatibleModelsError, MergeError, RecipeError, SourceError
from merge_engine.example import make_family, save_tiny_tokenizer, tiny_config
from tests.conftest import load_weights, write_recipe

MATH = [f"{i} + {i + 1} = {2 * i + 1}" for i in range(30)]
CODE = [f"def f{i}(x): return x * {i}" for i in range(30)]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """Two tiny Llama fine-tunes with a character tokenizer, and each one's data."""
    root = tmp_path_factory.mktemp("calibration")
    _, (a, b) = make_family(root / "models", "llama", finetunes=2, seed=3, scale=0.05)
    for folder in (a, b):
        save_tiny_tokenizer(folder)
    (root / "math.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in MATH) + "\n")
    (root / "code.txt").write_text("\n".join(CODE) + "\n")
    return {"root": root, "a": a, "b": b}


def mergebot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, timeout=300
    )


def token_batches(folder: Path, texts: list[str], batch_size: int) -> list[dict]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    out = []
    for i in range(0, len(texts), batch_size):
        encoded = [tokenizer(t)["input_ids"] for t in texts[i : i + batch_size]]
        width = max(map(len, encoded))
        out.append(
            {
                "input_ids": torch.tensor([e + [0] * (width - len(e)) for e in encoded]),
                "attention_mask": torch.tensor(
                    [[1] * len(e) + [0] * (width - len(e)) for e in encoded]
                ),
            }
        )
    return out


def inputs_of(folder: Path, module: str, batches: list[dict]) -> torch.Tensor:
    """Every unpadded input row that ``module`` of the model in ``folder`` sees."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    rows = []
    handle = model.get_submodule(module).register_forward_hook(
        lambda _m, inputs, _o: rows.append(inputs[0])
    )
    with torch.no_grad():
        for batch in batches:
            model(**batch)
            rows[-1] = rows[-1][batch["attention_mask"].bool()]
    handle.remove()
    return torch.cat(rows).double()


def regmean_by_hand(weights, xs, alpha, ridge=1e-6):
    grams = [x.T @ x for x in xs]
    shrunk = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    total = sum(shrunk)
    total = total + ridge * torch.diag(total).mean() * torch.eye(len(total), dtype=total.dtype)
    numerator = sum(w.double() @ s for w, s in zip(weights, shrunk, strict=True))
    return torch.linalg.solve(total, numerator.T).T


@pytest.mark.slow
def test_regmean_through_mergebot_merge_matches_the_closed_form_and_reuses_statistics(family):
    root, a, b = family["root"], family["a"], family["b"]
    recipe = write_recipe(
        root,
        f"""merge_method: regmean
models:
  - model: {a}
    calibration: {{path: {root / "math.jsonl"}, samples: 12, batch_size: 5}}
  - model: {b}
    calibration: {{path: {root / "code.txt"}, samples: 12, batch_size: 5}}
parameters:
  alpha: 0.8
  use_data: [{{filter: lm_head, value: false}}, {{value: true}}]
dtype: float32
""",
    )
    stats = root / "stats"
    run = mergebot("merge", str(recipe), str(root / "out"), "--stats-dir", str(stats))
    assert run.returncode == 0, run.stderr
    merged = load_weights(root / "out")

    # the 12 examples each model ran on: seeded draws from each file, in file order
    import random

    picks = [sorted(random.Random(0).sample(range(30), 12)) for _ in range(2)]
    texts = [[MATH[i] for i in picks[0]], [CODE[i] for i in picks[1]]]
    batches = [token_batches(f, t, 5) for f, t in zip((a, b), texts, strict=True)]
    sources = [load_weights(a), load_weights(b)]
    for module in ("model.layers.0.self_attn.k_proj", "model.layers.2.mlp.down_proj"):
        xs = [inputs_of(f, module, bt) for f, bt in zip((a, b), batches, strict=True)]
        name = f"{module}.weight"
        expected = regmean_by_hand([s[name] for s in sources], xs, alpha=0.8)
        assert torch.allclose(merged[name].double(), expected, atol=1e-5), name
        plain = (sources[0][name] + sources[1][name]) / 2
        assert not torch.allclose(merged[name], plain, atol=1e-3)
    for name in ("lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"):
        assert torch.allclose(merged[name], (sources[0][name] + sources[1][name]) / 2, atol=1e-6)

    card = (root / "out" / "README.md").read_text()
    assert "## Calibration data" in card and "`math.jsonl`" in card and "`code.txt`" in card
    assert "| 12 | `gram` |" in card
    model = AutoModelForCausalLM.from_pretrained(root / "out")
    assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()

    # a second merge with another alpha reads the saved statistics: no model runs again
    files = {p: p.stat().st_mtime_ns for p in stats.iterdir()}
    assert len(files) == 2
    write_recipe(root, recipe.read_text().replace("alpha: 0.8", "alpha: 0.3"))
    again = mergebot("merge", str(recipe), str(root / "out2"), "--stats-dir", str(stats))
    assert again.returncode == 0, again.stderr
    assert "Gram matrices" not in again.stderr
    assert {p: p.stat().st_mtime_ns for p in stats.iterdir()} == files
    other = load_weights(root / "out2")["model.layers.2.mlp.down_proj.weight"]
    assert not torch.allclose(other, merged["model.layers.2.mlp.down_proj.weight"], atol=1e-4)


def fisher_by_hand(folder: Path, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Mean over examples of the squared gradient of each example's next-token log-likelihood."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    count = 0
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            ids = ids[mask.bool()].unsqueeze(0)
            model.zero_grad()
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
            logp.gather(1, ids[0, 1:, None]).sum().backward()
            for n, p in model.named_parameters():
                total[n] += p.grad**2
            count += 1
    return {n: t / count for n, t in total.items()}


@pytest.mark.slow
def test_fisher_with_shared_inline_examples_weights_each_entry_by_its_fisher(family):
    root, a, b = family["root"], family["a"], family["b"]
    examples = MATH[:3] + CODE[:3]
    recipe = load_recipe(
        write_recipe(
            root,
            f"""merge_method: fisher
models:
  - model: {a}
    parameters: {{weight: 2.0}}
  - model: {b}
calibration:
  examples: {json.dumps(examples)}
  batch_size: 4
parameters: {{normalize: true}}
""",
        )
    )
    merge(preflight(recipe), root / "fisher-out", stats_dir=root / "stats", show_progress=False)
    merged = load_weights(root / "fisher-out")
    sources = [load_weights(a), load_weights(b)]
    batches = [token_batches(f, examples, 4) for f in (a, b)]
    fishers = [fisher_by_hand(f, batches[i]) for i, f in enumerate((a, b))]
    means = [torch.cat([t.flatten() for t in f.values()]).double().mean() for f in fishers]
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.3.input_layernorm.weight"):
        f = [
            (fishers[i][name] / means[i]).double().clamp_min(1e-6) * w
            for i, w in ((0, 2.0), (1, 1.0))
        ]
        expected = (f[0] * sources[0][name] + f[1] * sources[1][name]) / (f[0] + f[1])
        assert torch.allclose(merged[name].double(), expected, rtol=1e-4, atol=1e-6), name
    card = (root / "fisher-out" / "README.md").read_text()
    assert "6 inline examples" in card and "`fisher_empirical`" in card


def test_a_sequence_classifier_merges_with_labels_from_a_csv_file(tmp_path):
    config = tiny_config("llama", num_labels=3, pad_token_id=0)
    config.id2label = {0: "neg", 1: "neutral", 2: "pos"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        folder = tmp_path / f"clf-{seed}"
        AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
        save_tiny_tokenizer(folder)
        folders.append(folder)
    (tmp_path / "reviews.csv").write_text(
        "review,sentiment\ngood film,pos\nbad film,neg\nit was fine,neutral\ngreat,2\n"
    )
    recipe = load_recipe(
        write_recipe(
            tmp_path,
            f"""merge_method: fisher
models: [{{model: {folders[0]}}}, {{model: {folders[1]}}}]
calibration: {{path: {tmp_path / "reviews.csv"}, text_field: review, label_field: sentiment}}
parameters: {{fisher: exact}}
""",
        )
    )
    out = merge(preflight(recipe), tmp_path / "out", stats_dir=tmp_path / "s", show_progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label[2] == "pos"
    assert "| 4 | `fisher_exact` |" in (out / "README.md").read_text()

    (tmp_path / "reviews.csv").write_text("review,sentiment\ngood film,amazing\n")
    with pytest.raises(RecipeError, match="label 'amazing' is not one of the model's labels"):
        merge(
            preflight(recipe), tmp_path / "out-bad", stats_dir=tmp_path / "s2", show_progress=False
        )
    assert not (tmp_path / "out-bad").exists()


# --- bad input: one sentence each ----------------------------------------------------------


def recipe_text(family, calibration_a: str = "", calibration_b: str = "", extra: str = "") -> str:
    return f"""merge_method: regmean
models:
  - model: {family["a"]}
{calibration_a}
  - model: {family["b"]}
{calibration_b}
{extra}"""


def check(family, text: str, error: type[MergeError], pattern: str, field: str | None = None):
    with pytest.raises(error, match=pattern) as caught:
        plan = preflight(load_recipe(write_recipe(family["root"], text)))
        merge(plan, family["root"] / "never", stats_dir=family["root"] / "bad-stats")
    assert not (family["root"] / "never").exists()
    if field:
        assert caught.value.field == field
    return str(caught.value)


def test_bad_calibration_input_is_one_clear_sentence(family):
    root = family["root"]
    own = "    calibration: {path: %s}"
    check(
        family,
        recipe_text(family, own % (root / "math.jsonl")),
        RecipeError,
        "needs calibration data for .*finetune-2: add a calibration block",
        "models[1].calibration",
    )
    check(
        family,
        recipe_text(family, extra=f"calibration: {{path: {root / 'missing.jsonl'}}}"),
        SourceError,
        "calibration file .*missing.jsonl does not exist; check the path",
    )
    (root / "empty.txt").write_text("\n\n")
    check(
        family,
        recipe_text(family, extra=f"calibration: {{path: {root / 'empty.txt'}}}"),
        RecipeError,
        "the calibration data of calibration is empty",
    )
    (root / "fields.jsonl").write_text('{"content": "1 + 1 = 2"}\n')
    message = check(
        family,
        recipe_text(family, extra=f"calibration: {{path: {root / 'fields.jsonl'}}}"),
        RecipeError,
        "example 1 has no field 'text' \\(it has content\\); set text_field",
        "calibration.text_field",
    )
    assert message.count(";") == 1
    check(
        family,
        recipe_text(family, extra="calibration: {examples: [a b c], label_field: label}"),
        RecipeError,
        "is a causal LM, which learns from the text itself; remove label_field",
    )
    check(
        family,
        recipe_text(family, extra="calibration: {examples: []}"),
        RecipeError,
        "'examples' is empty",
    )
    check(
        family,
        recipe_text(family, extra="calibration: {path: data.parquet}"),
        RecipeError,
        "must end in .txt, .jsonl, .csv",
    )
    slices = f"""merge_method: regmean
slices:
  - sources:
      - {{model: {family["a"]}, layer_range: [0, 4]}}
      - {{model: {family["b"]}, layer_range: [0, 4]}}
calibration: {{examples: [a]}}
"""
    check(family, slices, RecipeError, "list them under 'models', not 'slices'")


def test_models_whose_layers_do_not_match_are_refused_before_any_model_runs(family, tmp_path):
    _, (wide,) = make_family(tmp_path, "llama", finetunes=1, intermediate_size=48)
    text = recipe_text(family, extra="calibration: {examples: [a b c]}").replace(
        str(family["b"]), str(wide)
    )
    check(family, text, IncompatibleModelsError, "mlp.*shape")


def test_a_method_without_data_notes_that_the_calibration_block_is_ignored(family):
    text = recipe_text(
        family, extra="calibration: {examples: [abc]}\nparameters: {weight: 1.0}"
    ).replace("regmean", "linear")
    plan = preflight(load_recipe(write_recipe(family["root"], text)))
    assert plan.notes == ["linear uses no data: the calibration block is ignored"]
