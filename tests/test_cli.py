"""``mergebot`` end to end on tiny real models: merge, load with transformers, run a forward pass."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_weights, two_model_ties, write_recipe
from transformers import AutoModelForCausalLM

from merge_engine.cli import main
from merge_engine.example import EXAMPLE_SEARCH, EXAMPLE_TEXTS, save_tiny_tokenizer
from merge_engine.methods import all_methods, get_method
from merge_engine.sources.tensors import read_header
from service.cli import main as service_main
from service.demo import example_repo_ids

METHOD_NAMES = sorted(m.name for m in all_methods())


def forward_is_finite(folder) -> bool:
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    return bool(torch.isfinite(logits).all())


def average_recipe(folder, a, b):
    return write_recipe(
        folder,
        f"merge_method: linear\nmodels: [{{model: {a}}}, {{model: {b}}}]\nparameters: {{weight: 1}}\n",
    )


def test_ties_merge_loads_in_transformers_and_matches_the_in_memory_api(llama_family, tmp_path):
    base, (a, b, _) = llama_family
    recipe = write_recipe(
        tmp_path,
        f"""
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5, density: 0.5}}
""",
    )
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), str(out), "--quiet"]) == 0
    assert forward_is_finite(out)
    expected = two_model_ties(base, a, b)
    merged = load_weights(out)
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in merged)
    assert (out / "mergebot_recipe.yaml").is_file() and (out / "README.md").is_file()


def test_gpt2_with_tied_head_merges_and_loads(gpt2_family, tmp_path):
    base, (a, b) = gpt2_family
    recipe = write_recipe(
        tmp_path,
        f"""
merge_method: slerp
base_model: {a}
models: [{{model: {a}}}, {{model: {b}}}]
parameters:
  t: [{{filter: attn, value: [0, 1]}}, {{value: 0.5}}]
""",
    )
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), str(out), "--quiet"]) == 0
    assert "lm_head.weight" not in load_weights(out)
    assert forward_is_finite(out)


def test_frankenmerge_stacks_layers_renumbers_and_rewrites_the_config(llama_family, tmp_path):
    base, (a, b, _) = llama_family
    recipe = write_recipe(
        tmp_path,
        f"""
merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 3]}}]
  - sources: [{{model: {b}, layer_range: [1, 4]}}]
""",
    )
    out = tmp_path / "franken"
    assert main(["merge", str(recipe), str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    merged, wa, wb = load_weights(out), load_weights(a), load_weights(b)
    name = "self_attn.q_proj.weight"
    for out_layer, (source, layer) in enumerate(
        [(wa, 0), (wa, 1), (wa, 2), (wb, 1), (wb, 2), (wb, 3)]
    ):
        assert torch.equal(
            merged[f"model.layers.{out_layer}.{name}"], source[f"model.layers.{layer}.{name}"]
        )
    assert torch.equal(merged["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], wb["lm_head.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 6
    assert forward_is_finite(out)


def test_frankenmerge_rewrites_per_layer_config_lists(tmp_path):
    from merge_engine.example import make_family

    base, (a,) = make_family(
        tmp_path / "m", "llama", finetunes=1, layer_types=["full_attention"] * 4
    )
    config = json.loads((a / "config.json").read_text())
    assert (
        config.get("layer_types") == ["full_attention"] * 4
    )  # the fixture really has a per-layer list
    config["layer_types"] = [
        "full_attention",
        "full_attention",
        "full_attention",
        "sliding_attention",
    ]
    (a / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(
        tmp_path,
        f"""
merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [2, 4]}}]
  - sources: [{{model: {a}, layer_range: [3, 4]}}]
""",
    )
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 0
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_hidden_layers"] == 3
    assert written["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]


def test_random_merges_repeat_under_random_seed(llama_family, tmp_path):
    base, (a, b, _) = llama_family
    text = f"""
merge_method: dare_ties
base_model: {base}
models: [{{model: {a}, parameters: {{weight: 1.0, density: 0.5}}}}, {{model: {b}, parameters: {{weight: 1.0, density: 0.5}}}}]
random_seed: 42
"""
    recipe = write_recipe(tmp_path, text)
    for name in ("one", "two"):
        assert main(["merge", str(recipe), str(tmp_path / name), "--quiet"]) == 0
    one, two = load_weights(tmp_path / "one"), load_weights(tmp_path / "two")
    assert all(torch.equal(one[k], two[k]) for k in one)
    card = (tmp_path / "one" / "README.md").read_text()
    assert "Random seed: `42`" in card


def test_unseeded_random_merge_records_the_seed_it_drew(llama_family, tmp_path):
    base, (a, b, _) = llama_family
    recipe = write_recipe(
        tmp_path,
        f"""
merge_method: dare_linear
base_model: {base}
models: [{{model: {a}, parameters: {{weight: 1.0, density: 0.5}}}}]
""",
    )
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    seed = int(card.split("Random seed: `")[1].split("`")[0])
    written = tmp_path / "out" / "mergebot_recipe.yaml"
    assert f"random_seed: {seed}" in written.read_text()
    assert (
        main(["merge", str(written), str(tmp_path / "again"), "--quiet"]) == 0
    )  # the card's command
    first, second = load_weights(tmp_path / "out"), load_weights(tmp_path / "again")
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_shard_size_splits_the_output_and_writes_an_index(llama_family, tmp_path):
    base, (a, b, _) = llama_family
    recipe = average_recipe(tmp_path, a, b)
    out = tmp_path / "sharded"
    assert main(["merge", str(recipe), str(out), "--shard-size", "20KB", "--quiet"]) == 0
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert set(index["weight_map"]) == set(load_weights(a))
    for shard in shards:  # at most 20 kB of data each, unless one tensor alone is larger
        sizes = [info.nbytes for info in read_header(shard).values()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1
    assert forward_is_finite(out)


def test_dtype_option_sets_the_output_dtype_and_config(llama_family, tmp_path):
    base, (a, b, _) = llama_family
    recipe = average_recipe(tmp_path, a, b)
    out = tmp_path / "bf16"
    assert main(["merge", str(recipe), str(out), "--dtype", "bfloat16", "--quiet"]) == 0
    assert {t.dtype for t in load_weights(out).values()} == {torch.bfloat16}
    config = json.loads((out / "config.json").read_text())
    assert "bfloat16" in (config.get("torch_dtype"), config.get("dtype"))


def test_validate_reports_without_writing_anything(llama_family, tmp_path, capsys):
    base, (a, b, _) = llama_family
    recipe = write_recipe(
        tmp_path,
        f"merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 1, density: 0.5}}}}]\n",
    )
    assert main(["validate", str(recipe)]) == 0
    assert "ok: ties of 2 models (a base and 1 fine-tune)," in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_methods_lists_every_method_with_its_whole_description(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["method", "base", "data", "what", "it", "does"]
    rows = {line.split()[0]: line.split()[1:3] for line in lines[2:] if line[:1].strip()}
    assert {m.name for m in all_methods()} <= rows.keys()
    assert rows["della_linear"] == ["required", "no"]
    assert rows["regmean"] == ["unused", "calibration"]
    assert all(words(m.doc) in words(out) for m in all_methods())
    assert "…" not in out


@pytest.mark.parametrize(
    "args", [[], *([name] for name in METHOD_NAMES)], ids=["all", *METHOD_NAMES]
)
def test_methods_fits_a_100_column_terminal(args, capsys):
    assert main(["methods", *args]) == 0
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) <= 100


def words(text: str) -> str:
    """``text`` with every run of whitespace one space: wrapped lines read as one."""
    return " ".join(text.split())


def parameter_row(output: str, name: str) -> str:
    """The row of parameter ``name`` in ``mergebot methods METHOD``, its wrapped doc joined."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [name])
    end = next(
        (i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines)
    )
    return words(" ".join(lines[start:end]))


def test_methods_name_shows_each_parameter_in_full(capsys):
    slerp = get_method("slerp")
    assert main(["methods", "slerp"]) == 0
    out = capsys.readouterr().out
    assert slerp.doc in words(out) and slerp.paper in out
    assert parameter_row(out, "t") == f"t global float required {slerp.param('t').doc}"
    assert main(["methods", "della"]) == 0
    assert parameter_row(capsys.readouterr().out, "epsilon").startswith(
        "epsilon per_model float 0.15 [0, 1) half-width"
    )


@pytest.mark.parametrize("method", ["ties", "sce"])
def test_methods_name_prints_the_registry_doc_of_int8_mask(method, capsys):
    assert main(["methods", method]) == 0
    doc = get_method(method).param("int8_mask").doc
    assert parameter_row(capsys.readouterr().out, "int8_mask").endswith(doc)


def test_methods_with_an_unknown_name_lists_the_names_in_one_sentence(capsys):
    assert main(["methods", "zzz"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"error: unknown merge method 'zzz'; the methods are {', '.join(METHOD_NAMES)}.\n"
    )


def test_methods_with_a_misspelt_name_suggests_the_method_as_validate_does(
    llama_family, tmp_path, capsys
):
    assert main(["methods", "tiez"]) == 1
    assert capsys.readouterr().err == "error: unknown merge method 'tiez'; did you mean 'ties'?\n"
    recipe = write_recipe(tmp_path, f"merge_method: tiez\nmodels: [{{model: {llama_family[0]}}}]\n")
    assert main(["validate", str(recipe)]) == 1
    assert "unknown merge method 'tiez'; did you mean 'ties'?" in capsys.readouterr().err


def test_example_help_documents_its_arguments(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit):
        main(["example", "--help"])
    out = capsys.readouterr().out
    assert "WORK_DIR/recipe.yaml" in out and "WORK_DIR/search.yaml" in out
    assert "(default: mergebot-example)" in out
    assert "--device DEVICE  auto (GPU when there is one), cpu or cuda" in out


def test_jobs_columns_line_up_whatever_the_lengths(capsys):
    from service.cli import jobs_table

    jobs = [
        {"id": "search-1f2e3d", "status": "running", "stage": "search", "fraction": 0.25},
        {"id": "job-9a8b", "status": "succeeded", "stage": "done", "fraction": 1.0},
        {"id": "job-77c", "status": "queued", "stage": "pre-flight", "fraction": 0.0},
    ]
    for job, target in zip(jobs, ("demo/searched", "demo/merged", "demo/m"), strict=True):
        job["target"] = target
    header, rule, *rows = jobs_table(jobs)
    assert header.split() == ["id", "status", "stage", "done", "target"]
    starts = [i for i, c in enumerate(rule) if c == "-" and (i == 0 or rule[i - 1] == " ")]
    for row, job in zip(rows, jobs, strict=True):
        cells = [job["id"], job["status"], job["stage"], f"{job['fraction']:.0%}", job["target"]]
        assert [row.index(cell, start) for cell, start in zip(cells, starts, strict=True)] == starts
    assert jobs_table([]) == ["no jobs yet; send one with `mergebot submit`"]


def test_sandbox_hub_help_names_the_models_it_seeds(capsys, monkeypatch):
    from service.demo import ADAPTER_REPOS, DIFFUSION_REPOS, EXAMPLE_REPOS

    monkeypatch.setenv("COLUMNS", "300")  # argparse wraps at the terminal's width, even at a hyphen
    with pytest.raises(SystemExit):
        service_main(["sandbox-hub", "--help"])
    seed_help = next(
        line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("--seed")
    )
    assert "three fine-tunes" in seed_help and "two fine-tunes" in seed_help
    repos = EXAMPLE_REPOS + ADAPTER_REPOS + DIFFUSION_REPOS
    assert all(f"USER/{name}" in seed_help for name in repos)


@pytest.mark.slow
def test_sandbox_hub_names_every_seeded_model_and_prints_no_library_noise(tmp_path):
    hub = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "sandbox-hub", "--seed", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines = []
        while not lines or not lines[-1].startswith("example models: "):
            line = hub.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
    finally:
        hub.terminate()
        hub.wait(timeout=30)
    assert lines[-1] == "example models: " + ", ".join(example_repo_ids("demo")) + "\n"
    assert "demo/sd-photo" in lines[-1]
    assert lines[0].startswith("sandbox hub on http://127.0.0.1:"), "".join(lines)
    assert len(lines) == 3, "".join(lines)  # the URL, how to use it, the models: no warnings


HEAVY = {"torch", "transformers", "gradio", "dbos", "scipy"}
NEWLY_IMPORTED = """
import contextlib, io, json, sys
before = set(sys.modules)
from service.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main(sys.argv[1:])
print(json.dumps(sorted({name.split(".")[0] for name in set(sys.modules) - before})))
"""


def heavy_imports(*args: str) -> set[str]:
    """The heavy libraries that ``mergebot ARGS`` imports, run in a fresh interpreter; what
    the interpreter had loaded before (a sitecustomize, say) does not count."""
    run = subprocess.run(
        [sys.executable, "-c", NEWLY_IMPORTED, *args], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    return HEAVY & set(json.loads(run.stdout.splitlines()[-1]))


@pytest.mark.parametrize(
    "args", [["--help"], ["merge", "--help"], ["serve", "--help"]], ids=" ".join
)
def test_help_imports_no_heavy_library(args):
    assert heavy_imports(*args) == set()


def test_validate_of_a_local_recipe_imports_no_model_or_service_library(llama_family, tmp_path):
    base, (a, b, _) = llama_family
    recipe = write_recipe(
        tmp_path,
        f"merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\n",
    )
    assert heavy_imports("validate", str(recipe)).isdisjoint({"transformers", "gradio", "dbos"})


@pytest.mark.slow
def test_console_script_runs_the_example_end_to_end(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "merge_engine.cli",
            "example",
            str(tmp_path / "ex"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "logits finite: True" in run.stdout
    assert (tmp_path / "ex" / "merged" / "model.safetensors").is_file()
    assert (
        main(["example", str(tmp_path / "ex"), "--device", "cpu"]) == 0
    )  # the main job can run again


def save_tokenizer(folder, marker: str) -> None:
    """A real (word-level) tokenizer whose vocabulary contains ``marker``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, marker: 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)


def test_tokenizer_comes_from_the_donor_or_tokenizer_source(llama_family, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    base, a, b = (
        shutil.copytree(f, tmp_path / n)
        for f, n in zip((llama_family[0], *llama_family[1][:2]), ("base", "a", "b"), strict=True)
    )
    for folder in (base, a, b):
        save_tokenizer(folder, f"from-{folder.name}")
    text = f"merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\nparameters: {{weight: 1}}\n"
    assert main(["merge", str(write_recipe(tmp_path, text)), str(tmp_path / "one"), "--quiet"]) == 0
    assert "from-base" in AutoTokenizer.from_pretrained(tmp_path / "one").get_vocab()
    text += f"tokenizer_source: {b}\n"
    assert main(["merge", str(write_recipe(tmp_path, text)), str(tmp_path / "two"), "--quiet"]) == 0
    assert "from-b" in AutoTokenizer.from_pretrained(tmp_path / "two").get_vocab()


def test_filters_on_a_tied_head_match_the_head_name(llama_family, tmp_path):
    """mergekit matches a filter against the head's own name even when the model ties it."""
    from merge_engine.example import make_family

    _, (untied, *_) = llama_family
    _, (tied,) = make_family(
        tmp_path / "tied", "llama", finetunes=1, seed=5, tie_word_embeddings=True
    )
    assert "lm_head.weight" not in load_weights(tied)
    text = f"merge_method: linear\nmodels:\n  - model: {untied}\n    parameters: {{weight: 1}}\n  - model: {tied}\n    parameters: {{weight: [{{filter: lm_head, value: 0}}, {{value: 1}}]}}\n"
    assert main(["merge", str(write_recipe(tmp_path, text)), str(tmp_path / "out"), "--quiet"]) == 0
    merged, a, b = load_weights(tmp_path / "out"), load_weights(untied), load_weights(tied)
    assert torch.equal(merged["lm_head.weight"], a["lm_head.weight"])
    assert torch.allclose(
        merged["model.embed_tokens.weight"],
        (a["model.embed_tokens.weight"] + b["model.embed_tokens.weight"]) / 2,
    )


def test_gpt_neox_frankenmerge_takes_its_output_head_from_the_last_slice(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = GPTNeoXConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
        )
        GPTNeoXForCausalLM(config).save_pretrained(tmp_path / f"neox-{seed}")
        folders.append(tmp_path / f"neox-{seed}")
    text = f"merge_method: passthrough\nslices:\n  - sources: [{{model: {folders[0]}, layer_range: [0, 2]}}]\n  - sources: [{{model: {folders[1]}, layer_range: [2, 4]}}]\n"
    assert main(["merge", str(write_recipe(tmp_path, text)), str(tmp_path / "out"), "--quiet"]) == 0
    merged, first, last = (
        load_weights(tmp_path / "out"),
        load_weights(folders[0]),
        load_weights(folders[1]),
    )
    assert torch.equal(merged["embed_out.weight"], last["embed_out.weight"])
    assert torch.equal(merged["gpt_neox.embed_in.weight"], first["gpt_neox.embed_in.weight"])
    assert forward_is_finite(tmp_path / "out")


def test_submit_of_a_missing_recipe_file_is_one_sentence(tmp_path):
    ran = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "submit",
            str(tmp_path / "nothing.yaml"),
            "--to",
            "a/b",
        ],
        capture_output=True,
        text=True,
    )
    assert ran.returncode == 1
    assert (
        ran.stderr.strip()
        == f"error: cannot read the recipe file {tmp_path / 'nothing.yaml'} (FileNotFoundError); check the path"
    )


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_command(start: str) -> list[str]:
    """The README's command line that starts with ``start``, without its comment."""
    line = next(line for line in README.read_text().splitlines() if line.startswith(start))
    return shlex.split(line.split("#")[0])


@pytest.mark.slow
def test_the_example_then_the_readme_search_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert service_main(["example", "--device", "cpu"]) == 0
    assert "mergebot evolve mergebot-example/search.yaml" in capsys.readouterr().out
    mergebot, *args = readme_command("mergebot evolve mergebot-example/search.yaml")
    assert mergebot == "mergebot"
    assert service_main([*args, "--device", "cpu", "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "best of 4 trials" in said
    # the duration it says is the card's: the wall time budget.wall_time counts
    wall_time = re.search(r"^best of 4 trials: .+; (.+ of wall time)$", said, re.MULTILINE)[1]
    card = (tmp_path / "mergebot-example" / "searched" / "README.md").read_text()
    assert f"4 of 4 trials in {wall_time}." in card
    assert forward_is_finite(tmp_path / "mergebot-example" / "searched")
    assert service_main(["example", "--device", "cpu"]) == 0  # replaces the search's output too
    assert not (tmp_path / "mergebot-example" / "searched").exists()


def test_a_search_over_a_model_without_a_tokenizer_is_refused_naming_the_task(
    llama_family, tmp_path, capsys
):
    """Checked from the file lists, before any weight is read: nothing is written."""
    base, (a, b, _) = llama_family
    with_tokenizer = tmp_path / "with-tokenizer"
    shutil.copytree(b, with_tokenizer)
    save_tiny_tokenizer(with_tokenizer)
    spec = tmp_path / "search.yaml"
    spec.write_text(
        EXAMPLE_SEARCH.format(
            spec=spec, out="out", base=base, a=a, b=with_tokenizer, examples=list(EXAMPLE_TEXTS)
        )
    )
    out = tmp_path / "out"
    assert main(["evolve", str(spec), str(out), "--device", "cpu"]) == 1
    assert capsys.readouterr().err == (
        f"error: fitness[0]: the 'text' task tokenizes its text with the tokenizer of the first "
        f"model, {a}, which has no tokenizer files (tokenizer.json, tokenizer_config.json, ...); "
        f"list {with_tokenizer}, which has them, first in models\n"
    )
    assert not out.exists()
