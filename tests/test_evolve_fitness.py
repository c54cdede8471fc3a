"""The built-in evaluators against independent computations on real tiny models, and the
sentences a wrong task gets."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from old_evaluation import old_greedy, old_logprobs
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForSequenceClassification

from merge_engine import merge
from merge_engine.errors import RecipeError
from merge_engine.evolve.candidates import LayerCandidate, folded_recipe, load_source
from merge_engine.evolve.decoding import choice_scores, default_batch_size, greedy
from merge_engine.evolve.fitness import Fitness, evaluate, evaluate_task, read_task, read_tasks
from merge_engine.evolve.genome import LayerRef
from merge_engine.evolve.spec import FitnessTask, parse_spec
from merge_engine.evolve.task_rows import Score, TaskRows
from merge_engine.example import save_tiny_tokenizer, tiny_config
from merge_engine.recipe.schema import ModelReference

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest
CPU = torch.device("cpu")
TEXTS = ["the cat sat.", "a dog ran off to the park", "hi", "42 + 1 = 43", "ok then, bye!"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(save_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama")).eval()


def task(kind: str, examples: list, **options) -> FitnessTask:
    return FitnessTask.model_validate({"kind": kind, "data": {"examples": examples}, **options})


def rows_of(fitness_task: FitnessTask, where: str = "fitness[0]") -> TaskRows:
    """Every example on both sides, in order: the data is its own held-out data."""
    return read_task(fitness_task.model_copy(update={"held_out": fitness_task.data}), where)


def ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


# Reading


def test_search_rows_are_split_with_the_data_seed_and_keep_their_order():
    examples = [{"text": f"example {i}"} for i in range(8)]
    rows = read_task(task("nll", examples, held_out_fraction=0.25), "fitness[0]")
    assert (len(rows.search), len(rows.held_out)) == (6, 2)
    assert sorted(rows.search + rows.held_out, key=examples.index) == examples
    assert rows.search == sorted(rows.search, key=examples.index)
    assert read_task(task("nll", examples, held_out_fraction=0.25), "fitness[0]") == rows
    reseeded = task("nll", examples, data={"examples": examples, "seed": 5})
    assert read_task(reseeded, "fitness[0]").held_out != rows.held_out
    # at least one example on each side, however small the fraction
    two = read_task(task("nll", examples[:2], held_out_fraction=0.01), "fitness[0]")
    assert (len(two.search), len(two.held_out)) == (1, 1)


def test_given_held_out_data_and_plain_strings_and_names():
    held = {"examples": ["held out text"]}
    tasks = [
        task("nll", ["one", "two"], held_out=held),
        task("nll", ["three", "four"], name="wiki"),
    ]
    first, second = read_tasks(tasks)
    assert first.search == [{"text": "one"}, {"text": "two"}]
    assert first.held_out == [{"text": "held out text"}]
    assert (first.name, first.where, second.name, second.where) == (
        "nll",
        "fitness[0]",
        "wiki",
        "fitness[1]",
    )


def test_answers_are_normalised_on_copies_of_the_examples():
    examples = [{"prompt": "q", "choices": ["no", "yes"], "answer": "yes"}] * 2
    rows = rows_of(task("multiple_choice", examples))
    assert rows.search[0]["answer"] == 1 and examples[0]["answer"] == "yes"
    numeric = rows_of(task("exact_match", [{"prompt": "2+2=", "answer": 4}] * 2))
    assert numeric.search[0]["answer"] == "4"


def test_a_jsonl_file_is_sampled_and_errors_count_examples_in_the_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    lines = [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(6)]
    path.write_text("\n".join(json.dumps(line) for line in lines))
    data = {"path": str(path), "samples": 3, "seed": 1}
    rows = read_task(FitnessTask(kind="exact_match", data=data), "fitness[0]")
    assert len(rows.search) + len(rows.held_out) == 3
    assert all(row in lines for row in rows.search + rows.held_out)
    lines[4] = {"prompt": "q4"}
    path.write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(RecipeError, match="example 5 of fitness.0..data has no field 'answer'"):
        read_task(FitnessTask(kind="exact_match", data=data), "fitness[0]")


# Evaluating: each kind against an independent computation


def test_nll_is_the_token_weighted_mean_of_the_models_own_loss(lm, tokenizer):
    rows = rows_of(task("nll", TEXTS, batch_size=2))
    losses, counts = [], []
    for text in rows.search:
        input_ids = torch.tensor([ids(tokenizer, text["text"])])
        with torch.no_grad():
            losses.append(lm(input_ids=input_ids, labels=input_ids).loss.item())
        counts.append(input_ids.shape[1] - 1)
    expected = sum(loss * n for loss, n in zip(losses, counts, strict=True)) / sum(counts)
    score = evaluate_task(lm, tokenizer, rows, "search", CPU)
    assert (score.task, score.metric) == ("nll", "nll")
    assert score.value == pytest.approx(expected, rel=1e-5)
    assert score.fitness == -score.value


def test_nll_truncates_each_text_at_max_length(lm, tokenizer):
    rows = rows_of(task("nll", ["abcdefghij", "klmnopqrst"], max_length=4))
    truncated = rows_of(task("nll", ["abcd", "klmn"]))
    assert evaluate_task(lm, tokenizer, rows, "search", CPU).value == pytest.approx(
        evaluate_task(lm, tokenizer, truncated, "search", CPU).value, rel=1e-5
    )


QUESTIONS = [
    ("the capital is", ["paris", "rome", "a very long answer"]),
    ("2 + 2 =", [" 4", " 5"]),
    ("colour:", ["red", "green", "blue", "x"]),
    ("yes or no?", ["yes", "no"]),
    ("pick one", ["aa", "ab", "ba"]),
    ("(", [")", "]", "}"]),
]


def hand_choice(model, tokenizer, prompt: str, choices: list[str]) -> int:
    """The choice whose tokens have the highest summed log-probability after the prompt."""
    scores = []
    for choice in choices:
        prompt_ids, choice_ids = ids(tokenizer, prompt), ids(tokenizer, choice, False)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids + choice_ids])).logits[0]
        logprobs = torch.log_softmax(logits, dim=-1)
        scores.append(
            sum(logprobs[len(prompt_ids) + k - 1, t].item() for k, t in enumerate(choice_ids))
        )
    return int(torch.tensor(scores).argmax())


def test_multiple_choice_picks_the_most_likely_choice(lm, tokenizer):
    predicted = [hand_choice(lm, tokenizer, prompt, choices) for prompt, choices in QUESTIONS]
    right = [
        {"prompt": prompt, "choices": choices, "answer": answer}
        for (prompt, choices), answer in zip(QUESTIONS, predicted, strict=True)
    ]
    right[1]["answer"] = QUESTIONS[1][1][predicted[1]]  # an answer given as the choice's text
    score = evaluate_task(
        lm, tokenizer, rows_of(task("multiple_choice", right, batch_size=4)), "search", CPU
    )
    assert (score.metric, score.value, score.fitness) == ("accuracy", 1.0, 1.0)
    half = [
        {**example, "answer": (answer + (i % 2)) % len(example["choices"])}
        for i, (example, answer) in enumerate(zip(right, predicted, strict=True))
    ]
    score = evaluate_task(lm, tokenizer, rows_of(task("multiple_choice", half)), "search", CPU)
    assert score.value == 0.5


def test_exact_match_agrees_with_transformers_generate(lm, tokenizer):
    prompts = ["once upon a", "1, 2, 3,", "hello"]
    outputs = []
    for prompt in prompts:
        input_ids = torch.tensor([ids(tokenizer, prompt)])
        generated = lm.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=5,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = generated[0, input_ids.shape[1] :].tolist()
        outputs.append(tokenizer.decode(new, skip_special_tokens=True))
    examples = [
        {"prompt": prompts[0], "answer": outputs[0]},
        {"prompt": prompts[1], "answer": f"  {outputs[1]} \n"},
        {"prompt": prompts[2], "answer": outputs[2] + " and more"},
    ]
    rows = rows_of(task("exact_match", examples, max_new_tokens=5, batch_size=2))
    score = evaluate_task(lm, tokenizer, rows, "search", CPU)
    assert (score.metric, score.value) == ("exact_match", pytest.approx(2 / 3))


class NextLetter(torch.nn.Module):
    """A model with no ``generate``: after 'a' comes 'b', after 'b' 'c', after 'c' the end;
    after anything else 'x'. It reads only the last token, so it needs no cache, and returns
    ``.logits`` and an empty ``.cache``."""

    def __init__(self, tokenizer):
        super().__init__()
        self.table = torch.full((96,), tokenizer.convert_tokens_to_ids("x"))
        a, b, c = tokenizer.convert_tokens_to_ids(["a", "b", "c"])
        self.table[a], self.table[b], self.table[c] = b, c, tokenizer.eos_token_id

    def forward(self, input_ids, attention_mask, **cache_options):
        logits = torch.nn.functional.one_hot(self.table[input_ids], 96).float()
        return SimpleNamespace(logits=logits, cache=None)


def test_greedy_decoding_continues_each_prompt_and_stops_at_eos(tokenizer):
    examples = [
        {"prompt": "a", "answer": "bc"},
        {"prompt": "long prompt b", "answer": "c"},
        {"prompt": "zz", "answer": "xxxx"},  # no eos: max_new_tokens
    ]
    rows = rows_of(task("exact_match", examples, max_new_tokens=4, batch_size=3))
    model = NextLetter(tokenizer).train()
    score = evaluate_task(model, tokenizer, rows, "search", CPU)
    assert score.value == 1.0
    assert model.training  # left as it was


# Evaluating over the cache: the same as transformers' generate and as the old loops


def generated(model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """transformers' greedy generate of one prompt, up to and with eos."""
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=0,
            eos_token_id=eos,
        )
    new = out[0, len(prompt) :].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


def random_prompts(count: int, seed: int, lengths: tuple[int, int] = (1, 9)) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (count,), generator=generator)
    return [torch.randint(3, 90, (int(n),), generator=generator).tolist() for n in sizes]


def test_cached_greedy_equals_generate_token_for_token(lm):
    prompts = random_prompts(30, seed=1)
    eos = 2
    with torch.no_grad():
        outputs = greedy(lm, prompts, 10, eos, 4, CPU)
    assert outputs == [generated(lm, prompt, 10, eos) for prompt in prompts]
    assert any(out[-1] == eos for out in outputs)  # some stop early, ...
    assert any(len(out) == 10 for out in outputs)  # ... some run to max_new_tokens
    assert len({len(p) for p in prompts}) > 1  # batches of several lengths


def test_a_layer_path_that_repeats_a_layer_generates_as_its_written_model(scored_family, tmp_path):
    """Each slot has its own cache entry: the path over loaded layers, one used twice,
    generates what ``generate`` of the written (folded) model does."""
    base, tuned = scored_family
    refs = [ModelReference.parse(str(base)), ModelReference.parse(str(tuned[0]))]
    candidate = LayerCandidate([load_source(ref, CPU) for ref in refs])
    path = [
        (LayerRef(0, 0), 1.0),
        (LayerRef(1, 1), 0.8),
        (LayerRef(0, 0), 1.25),  # the first layer again, in a slot of its own
        (LayerRef(1, 1), 1.0),  # and the second
        (LayerRef(0, 3), 1.0),
    ]
    model = candidate.build(path)
    merge(folded_recipe(path, refs), tmp_path / "written")
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "written").eval()
    prompts = random_prompts(12, seed=2)
    eos = 2
    with torch.no_grad():
        outputs = greedy(model, prompts, 8, eos, 5, CPU)
    assert outputs == [generated(written, prompt, 8, eos) for prompt in prompts]
    assert len({t for out in outputs for t in out}) > 3  # not one token over and over


def test_the_scores_equal_the_old_loops(lm, tokenizer):
    """Exact match, each choice's score and nll, against the loops that ran before the cache
    (kept here as the reference), on the same data."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = random_prompts(20, seed=3)
    with torch.no_grad():
        assert greedy(lm, prompts, 6, eos, 3, CPU) == old_greedy(lm, prompts, 6, eos, pad)

    # choices sharing their prompt; the short max_length cuts some prompts per choice; each
    # prompt also gets its own greedy continuation as a choice
    pairs = []
    for prompt in random_prompts(9, seed=4, lengths=(2, 8)):
        for choice in random_prompts(3, seed=len(pairs), lengths=(1, 4)):
            pairs.append((prompt[-(8 - len(choice)) :], choice))
        with torch.no_grad():
            own = greedy(lm, [prompt[-5:]], 3, None, 1, CPU)[0]
        pairs.append((prompt[-5:], own))
    with torch.no_grad():
        scores = choice_scores(lm, pairs, pad, 5, CPU)
        expected = [
            logprob[-len(choice) :].sum().item()
            for (prompt, choice) in pairs
            for logprob in old_logprobs(lm, [prompt + choice], pad)
        ]
        predicted = [
            lm(input_ids=torch.tensor([prompt + choice])).logits[0, len(prompt) - 1 : -1].argmax(-1)
            for prompt, choice in pairs
        ]
    assert [s.logprob for s in scores] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert [s.greedy for s in scores] == [
        p.tolist() == choice for p, (_, choice) in zip(predicted, pairs, strict=True)
    ]
    assert sum(s.greedy for s in scores) >= 9  # every prompt's own continuation at least
    assert len({tuple(p) for p, _ in pairs}) > 9  # some prompts were cut

    texts = [{"text": t} for t in TEXTS * 3]
    rows = rows_of(task("nll", texts, batch_size=4))
    with torch.no_grad():
        logprobs = old_logprobs(lm, [ids(tokenizer, t) for t in TEXTS * 3], pad)
    expected = -sum(lp.sum().item() for lp in logprobs) / sum(lp.numel() for lp in logprobs)
    assert evaluate_task(lm, tokenizer, rows, "search", CPU).value == pytest.approx(
        expected, rel=1e-6
    )


def test_the_default_batch_size_follows_the_device_and_the_model(lm):
    # the tiny Llama (vocabulary 96, 4 layers of width 32) on a CPU: an 8 MiB budget
    assert default_batch_size(lm, CPU, 20, 1) == 256  # greedy, one position's logits: the limit
    assert default_batch_size(lm, CPU, 256, 256) == (8 << 20) // (4 * 256 * (96 + 2 * 4 * 32))
    weights = torch.empty(7_000_000_000, dtype=torch.bfloat16, device="meta")
    seven_b = SimpleNamespace(
        config=SimpleNamespace(vocab_size=32_000, hidden_size=4_096, num_hidden_layers=32),
        parameters=lambda: [weights],
    )
    # a 7B Llama on a CPU: a quarter of its 14 GB of weights, 285 MB per sequence of 272
    # tokens (4 bytes × 272 × 2 × 32 × 4,096 of cache, one position's 32,000 logits)
    assert default_batch_size(seven_b, CPU, 272, 1) == 12
    assert default_batch_size(seven_b, CPU, 8_192, 8_192) == 1


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(1)
    labels = {0: "neg", 1: "neu", 2: "pos"}
    config = tiny_config(
        "llama", pad_token_id=0, id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    return LlamaForSequenceClassification(config).eval()


def test_classification_is_the_argmax_of_each_unpadded_text(classifier, tokenizer):
    predicted = []
    for text in TEXTS:
        with torch.no_grad():
            logits = classifier(input_ids=torch.tensor([ids(tokenizer, text)])).logits
        predicted.append(int(logits.argmax(-1)))
    names = classifier.config.id2label
    examples = [
        {"text": TEXTS[0], "label": names[predicted[0]]},
        {"text": TEXTS[1], "label": predicted[1]},
        {"text": TEXTS[2], "label": str(predicted[2])},
        {"text": TEXTS[3], "label": names[(predicted[3] + 1) % 3]},
        {"text": TEXTS[4], "label": (predicted[4] + 2) % 3},
    ]
    rows = rows_of(task("classification", examples, batch_size=2))
    score = evaluate_task(classifier, tokenizer, rows, "search", CPU)
    assert (score.metric, score.value) == ("accuracy", pytest.approx(3 / 5))


def test_total_is_the_weighted_mean_of_the_fitnesses(lm, tokenizer):
    tasks = [
        TaskRows(
            task("nll", TEXTS, weight=3.0), "nll", "fitness[0]", [], [{"text": t} for t in TEXTS]
        ),
        TaskRows(
            task("exact_match", [{"prompt": "p", "answer": "a"}] * 2, name="never"),
            "never",
            "fitness[1]",
            [],
            [{"prompt": "hello", "answer": "surely not this"}],
        ),
    ]
    result = evaluate(lm, tokenizer, tasks, "held_out", CPU)
    nll = evaluate_task(lm, tokenizer, tasks[0], "held_out", CPU)
    assert isinstance(result, Fitness)
    assert result.scores == (nll, Score("never", "exact_match", 0.0, 0.0))
    assert result.total == pytest.approx((3 * -nll.value + 1 * 0.0) / 4)
    assert math.isfinite(result.total)
    with pytest.raises(ValueError, match="split must be one of search, held_out"):
        evaluate(lm, tokenizer, tasks, "test", CPU)


# Sentences


MC = {"prompt": "q", "choices": ["a", "b"], "answer": 0}
BAD_TASKS = [
    (
        "multiple_choice",
        [MC, MC, {"prompt": "q", "choices": ["a", "b"], "target": 0}],
        "fitness[0].answer_field: example 3 of fitness[0].data has no field 'answer' (it has choices, prompt, target); set answer_field to the right field",
    ),
    (
        "multiple_choice",
        [MC, {"question": "q", "choices": ["a", "b"], "answer": 0}],
        "fitness[0].prompt_field: example 2 of fitness[0].data has no field 'prompt' (it has answer, choices, question); set prompt_field to the right field",
    ),
    (
        "multiple_choice",
        [MC, {"prompt": "q", "choices": "a or b", "answer": 0}],
        "fitness[0].choices_field: example 2 of fitness[0].data has choices 'a or b', not a list of at least 2 non-empty strings; write the options as a list of texts",
    ),
    (
        "multiple_choice",
        [{"prompt": "q", "choices": ["only"], "answer": 0}],
        "fitness[0].choices_field: example 1 of fitness[0].data has choices ['only'], not a list of at least 2 non-empty strings; write the options as a list of texts",
    ),
    (
        "multiple_choice",
        [MC, {"prompt": "q", "choices": ["a", 2], "answer": 0}],
        "fitness[0].choices_field: example 2 of fitness[0].data has choices ['a', 2], not a list of at least 2 non-empty strings; write the options as a list of texts",
    ),
    (
        "multiple_choice",
        [MC, {"prompt": "q", "choices": ["a", "b"], "answer": 2}],
        "fitness[0].answer_field: example 2 of fitness[0].data has answer 2, neither an index of its 2 choices (from 0) nor one of them; write the right choice's index or text",
    ),
    (
        "multiple_choice",
        [MC, {"prompt": "q", "choices": ["a", "b"], "answer": "c"}],
        "fitness[0].answer_field: example 2 of fitness[0].data has answer 'c', neither an index of its 2 choices (from 0) nor one of them; write the right choice's index or text",
    ),
    (
        "exact_match",
        [{"prompt": "q", "answer": ["a"]}],
        "fitness[0].answer_field: example 1 of fitness[0].data has answer ['a'], not a text or a number; write the expected output as a string",
    ),
    (
        "classification",
        [{"text": "t", "label": True}],
        "fitness[0].label_field: example 1 of fitness[0].data has label True, not a class id or name; write an integer class id or one of the model's label names",
    ),
    (
        "nll",
        [{"text": "t"}, {"text": ""}],
        "fitness[0].text_field: example 2 of fitness[0].data has text '', not a text; write it as a non-empty string",
    ),
    (
        "nll",
        ["only one"],
        "fitness[0].data: fitness[0].data has 1 example, too few to keep some for the held-out score; add examples or give held_out",
    ),
]


@pytest.mark.parametrize("kind, examples, sentence", BAD_TASKS)
def test_a_wrong_task_gets_one_sentence(kind, examples, sentence):
    with pytest.raises(RecipeError) as error:
        read_task(task(kind, examples), "fitness[0]")
    assert str(error.value) == sentence


def test_held_out_data_is_checked_under_its_own_field():
    bad = task("nll", ["a", "b"], held_out={"examples": [{"txt": "c"}]})
    with pytest.raises(RecipeError) as error:
        read_task(bad, "fitness[2]")
    assert str(error.value) == (
        "fitness[2].text_field: example 1 of fitness[2].held_out has no field 'text' (it has txt); set text_field to the right field"
    )


def test_empty_data_names_the_data_field(tmp_path):
    spec = {
        "space": "parameters",
        "models": [{"model": "org/a"}],
        "fitness": [{"kind": "nll", "data": {"examples": []}}],
        "budget": {"trials": 2},
    }
    with pytest.raises(
        RecipeError, match=r"^fitness\[0\]\.data.*'examples' is empty; give at least one example"
    ):
        parse_spec(spec)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(RecipeError) as error:
        read_task(FitnessTask(kind="nll", data={"path": str(empty)}), "fitness[0]")
    assert error.value.field == "fitness[0].data"
    assert "is empty; give it at least one example" in str(error.value)


def test_a_local_file_is_refused_where_only_the_hub_is_read(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("one\ntwo\n")
    with pytest.raises(RecipeError) as error:
        read_task(FitnessTask(kind="nll", data={"path": str(path)}), "fitness[0]", hub_only=True)
    assert error.value.field == "fitness[0].data.path"


def test_an_unknown_label_names_the_models_labels(classifier, tokenizer):
    rows = rows_of(task("classification", [{"text": "t", "label": "positive"}] * 2))
    with pytest.raises(RecipeError) as error:
        evaluate_task(classifier, tokenizer, rows, "search", CPU)
    assert str(error.value) == (
        "fitness[0].label_field: label 'positive' in the examples of fitness[0] is not one of the model's labels (neg, neu, pos, or ids 0 to 2); fix the data or label_field"
    )
    out_of_range = rows_of(task("classification", [{"text": "t", "label": 3}] * 2))
    with pytest.raises(RecipeError, match="label 3 in the examples of fitness.0. is not one"):
        evaluate_task(classifier, tokenizer, out_of_range, "search", CPU)
