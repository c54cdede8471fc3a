"""Git Re-Basin and REPAIR (merge_engine.align): every supported family keeps its function under
a random permutation and weight matching finds that permutation again; REPAIR and RESET hit the
statistics they aim for; two MLPs trained on digits from different seeds merge across the
barrier; bad input is one clear error."""

from __future__ import annotations

import textwrap
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import merge_engine.align as align
from merge_engine.align import (
    activation_matching,
    apply_permutation,
    interpolate,
    load_into,
    load_permutations,
    permute_model,
    random_permutations,
    repair,
    reset_batchnorm,
    save_permutations,
    spec_for,
    transformer_spec,
    unapply_permutation,
    weight_matching,
)
from merge_engine.align.repair import channel_stats
from merge_engine.errors import IncompatibleModelsError, RecipeError, SourceError


def jitter(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (norms and BatchNorm statistics included), so that no unit is
    interchangeable with another by accident and every fixed tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=g) * 0.1
                tensor.copy_(
                    tensor.abs() + 0.5 + noise if "running_var" in name else tensor + noise
                )
    return model.eval()


def mlp(norm: type[nn.Module] | None = None, width: int = 24) -> nn.Module:
    def block(n_in: int) -> list[nn.Module]:
        return [nn.Linear(n_in, width), *([norm(width)] if norm else []), nn.ReLU()]

    return nn.Sequential(*block(10), *block(width), *block(width), nn.Linear(width, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(12 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )


def tiny_transformer(model_type: str) -> nn.Module:
    from transformers import (
        AutoModelForCausalLM,
        BertConfig,
        BertModel,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    common = dict(vocab_size=64, max_position_embeddings=32, num_hidden_layers=2)
    gqa = dict(common, hidden_size=32, intermediate_size=40, num_attention_heads=4)
    if model_type == "bert":
        return BertModel(BertConfig(**gqa))
    config = {
        "llama": lambda: LlamaConfig(**gqa, num_key_value_heads=2),  # 2 query heads per KV head
        "mistral": lambda: MistralConfig(**gqa, num_key_value_heads=1),
        "qwen2": lambda: Qwen2Config(**gqa, num_key_value_heads=2),  # q/k/v biases
        "gpt2": lambda: GPT2Config(vocab_size=64, n_positions=32, n_layer=2, n_embd=32, n_head=4),
    }[model_type]()
    return AutoModelForCausalLM.from_config(config)


CASES = {
    "mlp": (lambda: mlp(), lambda: torch.randn(16, 10)),
    "mlp-batchnorm": (lambda: mlp(nn.BatchNorm1d), lambda: torch.randn(16, 10)),
    "mlp-layernorm": (lambda: mlp(nn.LayerNorm), lambda: torch.randn(16, 10)),
    "cnn-batchnorm": (cnn, lambda: torch.randn(4, 3, 8, 8)),
    **{
        family: (lambda f=family: tiny_transformer(f), lambda: torch.randint(0, 64, (2, 12)))
        for family in ("llama", "mistral", "qwen2", "gpt2", "bert")
    },
}


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_permuted_model_computes_the_same_and_weight_matching_finds_the_permutation(case):
    make, inputs = CASES[case]
    torch.manual_seed(0)
    model = jitter(make())
    spec = spec_for(model)
    perms = random_permutations(spec, seed=1)
    permuted = permute_model(model, perms, spec)
    x = inputs()
    torch.testing.assert_close(output(permuted, x), output(model, x), atol=1e-5, rtol=1e-5)
    # the check can fail: undo the permutation of one tensor of the largest group
    largest = max(spec.groups, key=lambda g: spec.groups[g].size)
    name = spec.touching()[largest][0][0]
    broken = load_into(model, {**permuted.state_dict(), name: model.state_dict()[name]})
    assert not torch.allclose(output(broken, x), output(model, x), atol=1e-4)

    found, report = weight_matching(permuted, model, spec)
    assert report.converged and report.objective == sorted(report.objective)
    for name, perm in perms.items():
        assert torch.equal(found[name], perm), name
    back = unapply_permutation(permuted.state_dict(), spec, perms)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", ["mlp", "mlp-batchnorm", "cnn-batchnorm", "llama", "gpt2", "bert"])
def test_activation_matching_finds_the_permutation(case):
    make, inputs = CASES[case]
    torch.manual_seed(0)
    batches = [inputs() for _ in range(4)]
    # BatchNorm statistics of this data, not random ones: no unit is dead on every input
    model = reset_batchnorm(jitter(make()), batches)
    perms = random_permutations(spec_for(model), seed=2)
    permuted = permute_model(model, perms)
    found, report = activation_matching(permuted, model, batches)
    assert report.objective[1] >= report.objective[0]
    # ReLU units that are dead on every input are interchangeable: the function is the test
    aligned = permute_model(model, found)
    for x in batches:
        torch.testing.assert_close(output(aligned, x), output(permuted, x), atol=1e-5, rtol=1e-5)
    if case in ("llama", "gpt2", "bert"):  # smooth activations: no dead unit, one answer
        assert all(torch.equal(found[name], perm) for name, perm in perms.items())


def test_matching_two_different_llamas_moves_query_heads_with_their_key_value_head():
    torch.manual_seed(0)
    a, b = jitter(tiny_transformer("llama"), 1), jitter(tiny_transformer("llama"), 2)
    spec = spec_for(a)
    perms, report = weight_matching(a, b, spec, seed=3)
    assert report.converged and report.objective[-1] > report.objective[0]
    heads = perms["model.layers.0.attn_heads"].reshape(2, 2) // 2  # (KV head, its query heads)
    assert (heads == heads[:, :1]).all()
    x = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(
        output(permute_model(b, perms), x), output(b, x), atol=1e-5, rtol=1e-5
    )


def test_specs_keep_the_residual_stream_fixed_and_move_whole_heads():
    spec = spec_for(tiny_transformer("llama"))
    layer = "model.layers.1"
    assert spec.groups[f"{layer}.attn_heads"] == align.Group(4, share=2)
    assert spec.groups[f"{layer}.mlp_units"] == align.Group(40)
    for name in (
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        f"{layer}.input_layernorm.weight",
        f"{layer}.post_attention_layernorm.weight",
    ):
        assert all(axis is None for axis in spec.axes[name]), name
    q, k = (
        spec.axes[f"{layer}.self_attn.q_proj.weight"][0],
        spec.axes[f"{layer}.self_attn.k_proj.weight"][0],
    )
    assert (q.unit, q.shared, k.unit, k.shared) == (8, False, 8, True)
    assert spec.axes[f"{layer}.self_attn.o_proj.weight"] == (None, q)
    gpt2 = spec_for(tiny_transformer("gpt2"))
    # Conv1D weights are [in, out]: c_fc's units are its columns, c_proj's its rows
    assert gpt2.axes["transformer.h.0.mlp.c_fc.weight"][0] is None
    assert gpt2.axes["transformer.h.0.mlp.c_proj.weight"][1] is None
    assert gpt2.axes["transformer.h.0.attn.c_attn.weight"][1].repeat == 3
    assert list(spec_for(mlp()).groups) == ["0.out", "2.out", "4.out"]
    assert spec_for(cnn()).axes["8.weight"][1] == align.Axis("3.out", unit=16)


def _stats_of(model, layers, batches):
    return channel_stats(model.eval(), layers, batches, "cpu")


def test_repair_gives_every_hidden_channel_the_interpolated_statistics():
    torch.manual_seed(0)
    a, b = jitter(mlp(), 1), jitter(mlp(), 2)
    batches = [torch.randn(64, 10) for _ in range(3)]
    merged = load_into(a, interpolate(a, b, t=0.3))
    fixed = repair(merged, a, b, batches, t=0.3)
    hidden = ["0", "2", "4"]
    got, sa, sb, before = (_stats_of(m, hidden, batches) for m in (fixed, a, b, merged))
    for name in hidden:
        mean = 0.7 * sa[name][0] + 0.3 * sb[name][0]
        std = 0.7 * sa[name][1].sqrt() + 0.3 * sb[name][1].sqrt()
        torch.testing.assert_close(got[name][0], mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[name][1].sqrt(), std, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(before[name][1].sqrt(), std, atol=1e-2)  # it did change
    torch.testing.assert_close(fixed[6].weight, merged[6].weight)  # the output layer stays


def test_repair_resets_batchnorm_statistics_instead():
    torch.manual_seed(0)
    a, b = jitter(cnn(), 1), jitter(cnn(), 2)
    batches = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    merged = load_into(a, interpolate(a, b))
    fixed = repair(merged, a, b, batches)
    measured = _stats_of(fixed, ["0", "3", "8"], batches)
    for conv, norm in (("0", fixed[1]), ("3", fixed[4])):
        torch.testing.assert_close(
            norm.running_mean, measured[conv][0].float(), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            norm.running_var, measured[conv][1].float(), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(fixed[int(conv)].weight, merged[int(conv)].weight)
    reset = reset_batchnorm(merged, batches)  # the usual way: train-mode BN, cumulative average
    torch.testing.assert_close(reset[1].running_mean, fixed[1].running_mean, atol=1e-5, rtol=1e-5)


def test_permutations_round_trip_through_json_and_safetensors(tmp_path):
    model = tiny_transformer("llama")
    spec = spec_for(model)
    perms = random_permutations(spec, seed=3)
    for suffix in (".json", ".safetensors"):
        path = save_permutations(perms, tmp_path / f"perms{suffix}", spec)
        loaded = load_permutations(path, spec)
        assert all(torch.equal(loaded[k], perms[k]) for k in perms)
    state = apply_permutation(model.state_dict(), spec, load_permutations(tmp_path / "perms.json"))
    assert torch.equal(
        state["model.layers.0.mlp.up_proj.weight"],
        model.state_dict()["model.layers.0.mlp.up_proj.weight"][perms["model.layers.0.mlp_units"]],
    )


def test_the_module_docstring_example_runs():
    code = textwrap.dedent(align.__doc__.split("::\n")[1].split("\n\n``")[0])
    scope: dict = {}
    exec(code, scope)
    assert scope["report"].converged


def test_bad_input_is_one_clear_error(tmp_path):
    cases = [
        (
            lambda: transformer_spec(SimpleNamespace(model_type="t5"), {}),
            IncompatibleModelsError,
            "model_type 't5' has no permutation spec; alignment covers bert, gpt2, llama, mistral, qwen2",
        ),
        (
            lambda: weight_matching(mlp(width=24), mlp(width=32)),
            IncompatibleModelsError,
            "0.weight has shape (24, 10) in model A but (32, 10) in model B",
        ),
        (
            lambda: weight_matching(mlp().state_dict(), mlp().state_dict()),
            RecipeError,
            "pass spec=",
        ),
        (
            lambda: permute_model(mlp(), {"0.out": torch.arange(24)}),
            RecipeError,
            "the permutation of group 2.out is missing",
        ),
        (
            lambda: permute_model(
                mlp(), {g: torch.zeros(24, dtype=torch.long) for g in ("0.out", "2.out", "4.out")}
            ),
            RecipeError,
            "is not a permutation of 0..23",
        ),
        (
            lambda: apply_permutation(
                tiny_transformer("llama").state_dict(),
                spec_for(tiny_transformer("llama")),
                {
                    **random_permutations(spec_for(tiny_transformer("llama"))),
                    "model.layers.0.attn_heads": torch.tensor([0, 2, 1, 3]),
                },
            ),
            RecipeError,
            "splits a block of 2 query heads",
        ),
        (
            lambda: repair(
                tiny_transformer("gpt2"),
                tiny_transformer("gpt2"),
                tiny_transformer("gpt2"),
                [torch.zeros(1, 4, dtype=torch.long)],
            ),
            RecipeError,
            "REPAIR covers Linear/Conv2d stacks, not gpt2 models",
        ),
        (lambda: repair(mlp(), mlp(), mlp(), []), Exception, "the calibration data is empty"),
        (lambda: interpolate(mlp(), mlp(), t=1.5), RecipeError, "t must lie in [0, 1]"),
        (
            lambda: spec_for(nn.Sequential(nn.Linear(3, 4), nn.Embedding(3, 4), nn.Linear(4, 2))),
            IncompatibleModelsError,
            "1 (Embedding) holds weights the stack spec does not understand",
        ),
        (lambda: load_permutations(tmp_path / "none.json"), SourceError, "no permutations file"),
    ]
    for call, error, sentence in cases:
        with pytest.raises(error) as caught:
            call()
        assert sentence in str(caught.value), str(caught.value)
        assert str(caught.value).count(". ") == 0, str(caught.value)  # one sentence


# Two MLPs trained on digits from different seeds: the barrier of their midpoint, plain,
# after weight matching, after REPAIR alone, and after both.
WIDTH, EPOCHS = 512, 5


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    return (x - x.mean(0)) / (x.std(0) + 1e-3), torch.tensor(y)


def _train(seed: int, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(64, WIDTH), nn.ReLU()]
    for _ in range(2):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(WIDTH, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(123)  # same data order for both
    for _ in range(EPOCHS):
        shuffled = torch.randperm(len(x), generator=order)
        for start in range(0, len(x), 64):
            index = shuffled[start : start + 64]
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.mark.slow
def test_on_digits_matching_and_repair_remove_the_loss_barrier(capsys, one_thread):
    x, y = _digits()
    batches = [x[i : i + 256] for i in range(0, len(x), 256)]
    clock = {}

    def timed(step, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        clock[step] = time.perf_counter() - start
        return result

    def loss(model) -> float:
        with torch.no_grad():
            return nn.functional.cross_entropy(model(x), y).item()

    def barrier(a, b, mid) -> float:
        return loss(mid) - (loss(a) + loss(b)) / 2

    a = timed("train A", _train, 0, x, y)
    b = timed("train B", _train, 1, x, y)
    naive = load_into(a, interpolate(a, b))
    perms, report = timed("weight matching", weight_matching, a, b, seed=0)
    aligned = permute_model(b, perms)
    matched = load_into(a, interpolate(a, aligned))
    repaired = timed("REPAIR", repair, naive, a, b, batches)
    both = repair(matched, a, aligned, batches)
    act_perms, _ = timed("activation matching", activation_matching, a, b, batches)
    act_aligned = permute_model(b, act_perms)
    by_activations = load_into(a, interpolate(a, act_aligned))

    base = barrier(a, b, naive)
    results = {
        "weight matching": barrier(a, aligned, matched),
        "REPAIR alone": barrier(a, b, repaired),
        "weight matching + REPAIR": barrier(a, aligned, both),
        "activation matching": barrier(a, act_aligned, by_activations),
    }
    cut = {k: 1 - v / base for k, v in results.items()}
    with capsys.disabled():
        print(
            f"\ndigits MLP 64-{WIDTH}x3-10, {EPOCHS} epochs: losses A {loss(a):.4f}, "
            f"B {loss(b):.4f}; midpoint barrier naive {base:.4f}"
        )
        for k, v in results.items():
            print(f"  {k:26s} barrier {v:.4f}  cut {cut[k]:.1%}")
        print(f"  weight matching: {report.iterations} passes, converged {report.converged}")
        print("  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in clock.items()))
    assert base > 0.3  # the models really are on either side of a barrier
    assert cut["weight matching"] >= 0.90
    assert cut["REPAIR alone"] >= 0.70
    assert cut["weight matching + REPAIR"] >= 0.95
    assert cut["activation matching"] >= 0.90
