"""Extracting a LoRA adapter from a fine-tune and its base: the truncated SVD
(``merge_engine/methods/low_rank.py``), the PEFT adapter writer and ``mergebot extract-lora``,
checked against an independent ``torch.linalg.svdvals`` and against PEFT itself."""

from __future__ import annotations

import pytest
import torch

from merge_engine.errors import RecipeError
from merge_engine.methods.low_rank import factor, rank_for_energy
from tests.conftest import load_weights


def _delta(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (16, 6, 3, 3), (8, 5, 1, 1)])
def test_full_rank_reconstructs_the_delta(shape):
    delta = _delta(shape)
    factors = factor(delta, rank=min(shape[0], delta[0].numel()))
    assert factors.up.shape[:2] == (shape[0], factors.rank)
    assert factors.down.shape == (factors.rank, *shape[1:])
    torch.testing.assert_close(factors.product(), delta, rtol=0, atol=2e-5)
    assert factors.relative_error < 1e-6


@pytest.mark.parametrize("split", ["balanced", "up"])
@pytest.mark.parametrize("shape", [(30, 50), (12, 4, 3, 3)])
def test_rank_r_error_is_the_dropped_singular_values(shape, split):
    """The residual's own singular values (computed independently, in float64) are the
    dropped ones: Frobenius √Σ dropped², spectral the first dropped, nuclear Σ dropped."""
    delta = _delta(shape, seed=1).double()
    rank = 5
    factors = factor(delta, rank=rank, split=split)
    everything = torch.linalg.svdvals(delta.flatten(1))
    residual = torch.linalg.svdvals((delta - factors.product()).flatten(1))
    dropped = everything[rank:]
    torch.testing.assert_close(residual[: dropped.numel()], dropped)
    assert factors.error == pytest.approx(float(dropped.square().sum().sqrt()), rel=1e-10)
    assert float(residual[0]) == pytest.approx(float(dropped[0]), rel=1e-10)
    assert float(residual.sum()) == pytest.approx(float(dropped.sum()), rel=1e-9)
    frobenius = float(torch.linalg.matrix_norm(delta.flatten(1) - factors.product().flatten(1)))
    assert factors.error == pytest.approx(frobenius, rel=1e-10)
    assert factors.relative_error == pytest.approx(frobenius / float(delta.norm()), rel=1e-10)


def test_float32_error_matches_the_float64_svd():
    delta = _delta((64, 96), seed=2)
    factors = factor(delta, rank=8)
    residual = (delta.double() - factors.product().double()).norm()
    dropped = torch.linalg.svdvals(delta.double())[8:]
    assert factors.error == pytest.approx(float(dropped.square().sum().sqrt()), rel=1e-5)
    assert float(residual) == pytest.approx(factors.error, rel=1e-5)


def test_energy_threshold_picks_the_smallest_rank_that_keeps_it():
    # Singular values 4, 3, 2, 1 (squares 16, 9, 4, 1: total 30) in random bases.
    u, _ = torch.linalg.qr(_delta((20, 4), seed=3).double())
    v, _ = torch.linalg.qr(_delta((10, 4), seed=4).double())
    delta = u @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ v.T
    for energy, rank in [(0.5, 1), (16 / 30, 1), (0.54, 2), (25 / 30, 2), (0.9, 3), (1.0, 4)]:
        assert factor(delta, energy=energy).rank == rank, energy
    assert factor(delta, rank=2, energy=0.99).rank == 2  # the rank caps the threshold
    assert rank_for_energy(torch.zeros(5), 0.9) == 1


def test_bad_ranks_and_thresholds_are_refused_in_one_sentence():
    delta = _delta((6, 10))
    with pytest.raises(
        RecipeError,
        match=r"^rank: 7 is larger than q_proj \(6×10\) can have; ask for a rank of at most 6",
    ):
        factor(delta, rank=7, name="q_proj")
    with pytest.raises(RecipeError, match="at most 36"):
        factor(_delta((40, 4, 3, 3)), rank=37)
    with pytest.raises(RecipeError, match="^rank: 0 keeps nothing"):
        factor(delta, rank=0)
    for energy in (0, 1.5, float("nan")):
        with pytest.raises(RecipeError, match="^energy: .* is not a fraction"):
            factor(delta, energy=energy)


def _load_merged(base, adapter_folder) -> dict[str, torch.Tensor]:
    """PEFT's own reading of an adapter folder: loaded on the base, merged, unloaded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_folder)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def test_written_adapter_loads_in_peft_with_its_ranks_alphas_and_saved_modules(
    llama_family, tmp_path
):
    """Ranks and alphas that differ per module (rank_pattern, alpha_pattern), an embedding
    LoRA and a module saved whole: PEFT's merge equals base + scale · B @ A for each."""
    from merge_engine.output.peft_adapter import (
        LoraModule,
        PeftAdapter,
        PeftAdapterWriter,
        adapter_card,
    )
    from merge_engine.plan.merge_plan import PlannedTensor

    base, _ = llama_family
    weights = load_weights(base)
    module_names = [n.removesuffix(".weight") for n in weights if n.endswith(".weight")]
    modules = [
        LoraModule(f"model.layers.{i}.self_attn.q_proj", (32, 3), (3, 32), 6.0) for i in range(4)
    ]
    modules += [
        LoraModule("model.layers.0.self_attn.v_proj", (16, 2), (2, 32), 5.0),
        LoraModule("model.embed_tokens", (32, 3), (3, 96), 6.0, embedding=True),
    ]
    generator = torch.Generator().manual_seed(5)
    factors = {
        m.name: (
            torch.randn(m.up_shape, generator=generator),
            torch.randn(m.down_shape, generator=generator),
        )
        for m in modules
    }
    head = torch.randn((96, 32), generator=generator)
    adapter = PeftAdapter(
        str(base),
        tuple(modules),
        torch.float32,
        saved=(PlannedTensor("lm_head.weight", (96, 32), torch.float32),),
        base_modules=module_names,
    )
    config = adapter.config()
    assert config["r"] == 3 and config["lora_alpha"] == 6
    assert config["rank_pattern"] == {"model.layers.0.self_attn.v_proj": 2}
    assert config["alpha_pattern"] == {"model.layers.0.self_attn.v_proj": 5}
    # q_proj is adapted in every layer, v_proj in one: short name for one, full path for the other.
    assert config["target_modules"] == ["embed_tokens", "model.layers.0.self_attn.v_proj", "q_proj"]
    writer = PeftAdapterWriter(tmp_path, adapter)
    for entry in adapter.write_order():  # the checkpoint's order: embeddings, layers, head
        if isinstance(entry, LoraModule):
            writer.write_module(entry, *factors[entry.name])
        else:
            writer.write_saved(entry.name, head)
    writer.finish(adapter_card("An adapter.", None))
    merged = _load_merged(base, tmp_path)
    for module in modules:
        up, down = factors[module.name]
        update = adapter.scale(module) * (up @ down)
        if module.embedding:
            update = update.T
        expected = weights[module.name + ".weight"] + update
        torch.testing.assert_close(merged[module.name + ".weight"], expected)
    torch.testing.assert_close(merged["lm_head.weight"], head)
    torch.testing.assert_close(
        merged["model.layers.1.self_attn.v_proj.weight"],
        weights["model.layers.1.self_attn.v_proj.weight"],
    )
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n")


def _extract(finetune, base, out, *options: str) -> None:
    from merge_engine.cli import main

    assert (
        main(["extract-lora", str(finetune), str(out), "--base", str(base), "--quiet", *options])
        == 0
    )


def _adapter_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def _linear_modules(weights: dict[str, torch.Tensor]) -> list[str]:
    """The weights extract-lora factors by default in the tiny Llama: the layers' projections."""
    return [n for n in weights if ".layers." in n and n.endswith("_proj.weight")]


def test_full_rank_extraction_reconstructs_the_difference_through_peft(llama_family, tmp_path):
    """Energy 1 keeps every non-zero singular value: PEFT's merge of the adapter on the base
    gives back the fine-tune's linear weights to float precision, and the base's other tensors
    (which the adapter leaves out and the card lists)."""
    import json

    base, (tuned, *_) = llama_family
    out = tmp_path / "adapter"
    _extract(tuned, base, out, "--energy", "1")
    merged = _load_merged(base, out)
    base_weights, tuned_weights = load_weights(base), load_weights(tuned)
    for name in _linear_modules(tuned_weights):
        torch.testing.assert_close(merged[name], tuned_weights[name], rtol=0, atol=1e-5)
    torch.testing.assert_close(merged["model.norm.weight"], base_weights["model.norm.weight"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 32  # q, o, gate, up, down: 32; k and v (16 × 32): 16
    assert config["rank_pattern"] == {
        f"model.layers.{i}.self_attn.{p}": 16 for i in range(4) for p in ("k_proj", "v_proj")
    }
    assert config["alpha_pattern"] == config["rank_pattern"]  # scale 1 everywhere
    card = (out / "README.md").read_text()
    assert "| `model.layers.0.self_attn.q_proj` | 32 | 0 |" in card
    assert "| `model.norm.weight` |" in card  # differs, left out, listed


@pytest.mark.parametrize("rank", [1, 5])
def test_rank_r_extraction_is_the_truncated_svd_and_peft_bakes_it(llama_family, tmp_path, rank):
    """Per module: B·A is the float64 SVD's rank-r approximation of the difference, the card's
    error is √(Σ dropped σ²)/‖ΔW‖_F from an independent ``svdvals``, and PEFT's
    ``merge_and_unload`` on the base gives base + that approximation."""
    base, (tuned, *_) = llama_family
    out = tmp_path / "adapter"
    _extract(tuned, base, out, "--rank", str(rank))
    factors = _adapter_tensors(out)
    merged = _load_merged(base, out)
    base_weights, tuned_weights = load_weights(base), load_weights(tuned)
    card = (out / "README.md").read_text()
    for name in _linear_modules(tuned_weights):
        delta = tuned_weights[name].double() - base_weights[name].double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        approximation = (u[:, :rank] * s[:rank]) @ vh[:rank]
        module = "base_model.model." + name.removesuffix(".weight")
        up, down = factors[module + ".lora_B.weight"], factors[module + ".lora_A.weight"]
        assert up.shape == (delta.shape[0], rank) and down.shape == (rank, delta.shape[1])
        torch.testing.assert_close((up @ down).double(), approximation, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            merged[name].double(), base_weights[name].double() + approximation, rtol=0, atol=1e-5
        )
        dropped = torch.linalg.svdvals(delta)[rank:]
        relative = float(dropped.square().sum().sqrt() / delta.norm())
        row = f"| `{name.removesuffix('.weight')}` | {rank} | {relative:.4g} |"
        assert row in card


def test_energy_threshold_picks_each_modules_smallest_sufficient_rank(llama_family, tmp_path):
    import json

    base, (_, tuned, _) = llama_family
    out = tmp_path / "adapter"
    energy = 0.6
    _extract(tuned, base, out, "--energy", str(energy))
    config = json.loads((out / "adapter_config.json").read_text())
    base_weights, tuned_weights = load_weights(base), load_weights(tuned)
    factors = _adapter_tensors(out)
    ranks = set()
    for name in _linear_modules(tuned_weights):
        squares = torch.linalg.svdvals(tuned_weights[name].double() - base_weights[name].double())
        kept = squares.square().cumsum(0) / squares.square().sum()
        expected = int((kept < energy).sum()) + 1  # the first rank reaching the fraction
        module = name.removesuffix(".weight")
        assert config["rank_pattern"].get(module, config["r"]) == expected, module
        assert factors[f"base_model.model.{module}.lora_A.weight"].shape[0] == expected
        ranks.add(expected)
    assert len(ranks) > 1  # the ranks differ by module, so rank_pattern was exercised


def test_gpt2_conv1d_layers_extract_with_fan_in_fan_out(gpt2_family, tmp_path):
    """GPT-2 keeps its linear weights in × out (Conv1D): the adapter says fan_in_fan_out and
    PEFT's merge gives back the fine-tune's weights at full rank."""
    import json

    base, (tuned, _) = gpt2_family
    out = tmp_path / "adapter"
    _extract(tuned, base, out, "--energy", "1")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    merged, tuned_weights = _load_merged(base, out), load_weights(tuned)
    layers = [
        n
        for n in tuned_weights
        if ".h." in n and n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
    ]
    assert len(layers) == 12
    for name in layers:
        torch.testing.assert_close(merged[name], tuned_weights[name], rtol=0, atol=1e-5)


def test_saved_modules_and_embedding_loras_load_in_peft(llama_family, tmp_path):
    """``--save lm_head`` stores the fine-tune's head whole; ``--lora-embeddings`` factors the
    input embedding too (PEFT's lora_embedding_A/B, applied transposed)."""
    import json

    base, (tuned, *_) = llama_family
    out = tmp_path / "adapter"
    _extract(tuned, base, out, "--energy", "1", "--save", "lm_head", "--lora-embeddings")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]
    assert "embed_tokens" in config["target_modules"]
    merged, tuned_weights = _load_merged(base, out), load_weights(tuned)
    torch.testing.assert_close(
        merged["lm_head.weight"], tuned_weights["lm_head.weight"], rtol=0, atol=0
    )
    torch.testing.assert_close(
        merged["model.embed_tokens.weight"],
        tuned_weights["model.embed_tokens.weight"],
        rtol=0,
        atol=1e-5,
    )


def test_cli_prints_a_summary_and_the_card_reproduces_the_command(llama_family, tmp_path, capsys):
    from merge_engine.cli import main

    base, (tuned, *_) = llama_family
    out = tmp_path / "adapter"
    assert main(["extract-lora", str(tuned), str(out), "--base", str(base), "--rank", "2"]) == 0
    captured = capsys.readouterr()
    assert f"extracted 28 modules at rank 2 into {out}" in captured.out
    assert "note: 11 tensor(s) outside the adapter differ from the base" in captured.out
    assert "extract-lora: 100%" in captured.err  # the progress bar, as mergebot merge has
    card = (out / "README.md").read_text()
    assert f"mergebot extract-lora {tuned} ./adapter --base {base} --rank 2" in card
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


@pytest.fixture(scope="module")
def odd_models(llama_family, tmp_path_factory):
    """A Llama of other shapes, and the fine-tune with one tensor missing."""
    from safetensors.torch import save_file

    from merge_engine.example import make_family

    folder = tmp_path_factory.mktemp("odd")
    wider, _ = make_family(folder / "wider", "llama", finetunes=0, intermediate_size=48)
    _, (tuned, *_) = llama_family
    missing = folder / "missing"
    missing.mkdir()
    (missing / "config.json").write_text((tuned / "config.json").read_text())
    weights = load_weights(tuned)
    del weights["model.layers.2.mlp.up_proj.weight"]
    save_file(weights, missing / "model.safetensors", metadata={"format": "pt"})
    return {"wider": wider, "missing": missing}


BAD_EXTRACTIONS = {
    "rank above the matrix": (
        ["--rank", "17"],
        "error: rank: 17 is larger than model.layers.0.self_attn.k_proj.weight (16×32) can have; "
        "ask for a rank of at most 16",
    ),
    "rank zero": (["--rank", "0"], "error: rank: 0 keeps nothing; ask for a rank of at least 1"),
    "energy above one": (
        ["--energy", "1.5"],
        "error: energy: 1.5 is not a fraction; give an energy threshold above 0 and at most 1 "
        "(0.9 keeps 90% of the squared singular values)",
    ),
    "neither": ([], "error: give --rank R, --energy F or both (the rank then caps the threshold)"),
    "unknown saved module": (
        ["--rank", "2", "--save", "lm_haed"],
        "error: save: no module of {tuned} is named 'lm_haed'; name a module by its path or its "
        "last parts, e.g. lm_head or model.embed_tokens",
    ),
    "not a reference": (
        ["--rank", "2", "--base", "org/base@bad rev"],
        "error: base: revision 'bad rev' is not a branch, tag or commit name git accepts (at most "
        "255 characters, no spaces, control characters, '..', '@{{', '//' or any of ~^:?*[\\, not "
        "starting with '-' or '/', not ending with '/', '.' or '.lock'); fix the revision",
    ),
    "other architecture": (
        ["--rank", "2", "--base", "{gpt2}"],
        "error: the fine-tune {tuned} is a llama (LlamaForCausalLM) and the base {gpt2} a gpt2 "
        "(GPT2LMHeadModel); give the base the fine-tune was trained from",
    ),
    "other shapes": (
        ["--rank", "2", "--base", "{wider}"],
        "error: tensor model.layers.0.mlp.down_proj.weight is 32×64 in the fine-tune {tuned} but "
        "32×48 in the base {wider}; give the base the fine-tune was trained from (with the same "
        "vocabulary)",
    ),
    "missing tensor": (
        ["--rank", "2", "--base", "{missing}"],
        "error: tensor model.layers.2.mlp.up_proj.weight is in {tuned} but missing from "
        "{missing}; give the base the fine-tune was trained from, both with all their weight files",
    ),
}


@pytest.mark.parametrize("case", list(BAD_EXTRACTIONS))
def test_bad_extractions_are_refused_in_one_sentence_writing_nothing(
    case, llama_family, gpt2_family, odd_models, tmp_path, capsys
):
    from merge_engine.cli import main

    base, (tuned, *_) = llama_family
    names = {"tuned": tuned, "gpt2": gpt2_family[0], **odd_models}
    options, expected = BAD_EXTRACTIONS[case]
    options = [option.format(**names) for option in options]
    out = tmp_path / "adapter"
    argv = ["extract-lora", str(tuned), str(out), "--base", str(base), "--quiet", *options]
    assert main(argv) == 1
    assert capsys.readouterr().err.splitlines() == [expected.format(**names)]
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_that_holds_something_is_refused(llama_family, tmp_path, capsys):
    from merge_engine.cli import main

    base, (tuned, *_) = llama_family
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "keep.txt").write_text("mine")
    argv = [
        "extract-lora",
        str(tuned),
        str(tmp_path / "adapter"),
        "--base",
        str(base),
        "--rank",
        "2",
    ]
    assert main(argv) == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "adapter").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging left behind


@pytest.mark.slow  # mergebot in a subprocess against the sandbox hub
def test_hub_references_are_pinned_in_the_adapter_and_its_card(llama_family, tmp_path):
    """A fine-tune named at a commit that is no longer its main, and a base named without one:
    the extraction reads the named commit (equal to extracting its local copy), and the config
    and the card pin both."""
    import json
    import os
    import subprocess
    import sys

    from huggingface_hub import HfApi

    from service.sandbox_hub import HubStore, SandboxHub, SandboxServer

    token = "hf_sandbox_alice"
    base, (tuned, other, _) = llama_family
    with SandboxServer(SandboxHub(HubStore(), users={token: "alice"})) as server:
        api = HfApi(endpoint=server.url, token=token)
        for name in ("base", "tuned"):
            api.create_repo(f"alice/{name}")
        base_sha = api.upload_folder(repo_id="alice/base", folder_path=base).oid
        tuned_sha = api.upload_folder(repo_id="alice/tuned", folder_path=tuned).oid
        api.upload_folder(repo_id="alice/tuned", folder_path=other)  # main moves on
        env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf-home")}
        env.update(HF_TOKEN=token, HF_HUB_DISABLE_TELEMETRY="1")
        out = tmp_path / "adapter"
        argv = ["extract-lora", f"alice/tuned@{tuned_sha}", str(out), "--base", "alice/base"]
        run = subprocess.run(
            [sys.executable, "-m", "merge_engine.cli", *argv, "--rank", "3", "--quiet"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    assert run.returncode == 0, run.stderr
    _extract(tuned, base, tmp_path / "local", "--rank", "3")
    from_hub, local = _adapter_tensors(out), _adapter_tensors(tmp_path / "local")
    assert from_hub.keys() == local.keys()
    for name, tensor in local.items():
        torch.testing.assert_close(from_hub[name], tensor, rtol=0, atol=0)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("alice/base", base_sha)
    card = (out / "README.md").read_text()
    assert "base_model: alice/base\n" in card and "base_model_relation: adapter" in card
    assert f"| `alice/tuned` | fine-tune | `{tuned_sha}` |" in card
    assert f"| `alice/base` | base | `{base_sha}` |" in card
    assert (
        f"mergebot extract-lora alice/tuned@{tuned_sha} ./adapter --base alice/base@{base_sha}"
        in card
    )


def test_a_failure_midway_leaves_no_folder_behind(llama_family, tmp_path):
    """The fine-tune's weight file is cut short after its header: the headers plan fine, the
    read fails part way, and neither the output nor its staging folder is left."""
    import shutil

    from merge_engine.extract import extract_lora, plan_extraction

    base, (tuned, *_) = llama_family
    cut = tmp_path / "cut"
    shutil.copytree(tuned, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    plan = plan_extraction(cut, base, rank=2)
    with pytest.raises(Exception):  # noqa: B017, PT011  (safetensors' own error for a short file)
        extract_lora(plan, tmp_path / "out", show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut"]
