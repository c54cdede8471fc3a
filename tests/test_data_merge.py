"""Merging with data: RegMean and Fisher merging against independent computations, their
fallbacks, and a small network fine-tuned on two tasks of scikit-learn's digits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merge_engine.data.stats import fisher_diagonal, gram_matrices, load_stats, save_stats
from merge_engine.errors import IncompatibleModelsError, MergeError
from merge_engine.run.data_merge import fisher_merge, regmean_merge


def least_squares_layer(x: torch.Tensor, y: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(x.shape[1], y.shape[1], bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    return layer


def test_regmean_of_least_squares_fits_is_the_joint_least_squares_fit():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(5, 3, generator=g, dtype=torch.float64)
    xs = [torch.randn(40, 5, generator=g, dtype=torch.float64) * s for s in (1.0, 3.0, 0.5)]
    ys = [x @ true + 0.3 * torch.randn(40, 3, generator=g, dtype=torch.float64) for x in xs]
    layers = [least_squares_layer(x, y) for x, y in zip(xs, ys, strict=True)]
    merged = regmean_merge(layers, [[x] for x in xs], alpha=1.0, ridge=0.0)
    joint = least_squares_layer(torch.cat(xs), torch.cat(ys)).weight
    assert torch.allclose(merged["weight"], joint, atol=1e-10)
    plain = torch.stack([layer.weight for layer in layers]).mean(0)
    assert not torch.allclose(plain, joint, atol=1e-3)  # the test can tell them apart


def test_a_feature_no_data_activates_keeps_the_plain_average():
    g = torch.Generator().manual_seed(1)
    layers = [nn.Linear(4, 2, bias=False) for _ in range(2)]
    xs = [torch.randn(20, 4, generator=g) for _ in range(2)]
    for x in xs:
        x[:, 2] = 0  # a dead input feature: the summed Gram matrix is singular
    merged = regmean_merge(layers, [[x] for x in xs], alpha=0.9)["weight"]
    assert torch.isfinite(merged).all()
    average = (layers[0].weight + layers[1].weight) / 2
    assert torch.allclose(merged[:, 2], average[:, 2])


def linear_softmax_fisher(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> dict:
    """By hand: ∂ log softmax(Wx + b)_y / ∂W = (onehot(y) − p) xᵀ, ∂/∂b = onehot(y) − p."""
    with torch.no_grad():
        p = torch.softmax(x @ layer.weight.T + layer.bias, dim=1)
    residual = nn.functional.one_hot(y, p.shape[1]).float() - p
    weight = (residual[:, :, None] * x[:, None, :]) ** 2
    return {"weight": weight.mean(0), "bias": (residual**2).mean(0)}


def test_fisher_merging_weights_each_entry_by_its_fisher():
    g = torch.Generator().manual_seed(4)
    models = [nn.Linear(3, 2) for _ in range(2)]
    batches = [
        (torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in models
    ]
    by_hand = [linear_softmax_fisher(m, *b) for m, b in zip(models, batches, strict=True)]
    for name in ("weight", "bias"):
        assert torch.allclose(fisher_diagonal(models[0], [batches[0]])[name], by_hand[0][name])
    for normalize in (False, True):
        got = fisher_merge(models, [[b] for b in batches], weights=[1.0, 3.0], normalize=normalize)
        means = [torch.cat([f["weight"].flatten(), f["bias"].flatten()]).mean() for f in by_hand]
        for name in ("weight", "bias"):
            fa, fb = (
                f[name] / (mean if normalize else 1) for f, mean in zip(by_hand, means, strict=True)
            )
            fa, fb = fa.clamp_min(1e-6), 3.0 * fb.clamp_min(1e-6)
            states = [m.state_dict()[name] for m in models]
            expected = (fa * states[0] + fb * states[1]) / (fa + fb)
            assert torch.allclose(got[name], expected, atol=1e-6), (name, normalize)


def test_statistics_round_trip_through_safetensors(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    grams = gram_matrices(model, [torch.randn(16, 4)])
    assert set(grams) == {"0.weight", "2.weight"} and grams["2.weight"].shape == (8, 8)
    loaded = load_stats(save_stats(grams, tmp_path / "stats" / "grams.safetensors"))
    assert all(torch.equal(loaded[k], grams[k]) for k in grams)


def test_bad_calibration_input_is_one_clear_error():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    with pytest.raises(MergeError, match="empty"):
        regmean_merge([a, b], [[], []])
    with pytest.raises(MergeError, match="one set of calibration batches per model"):
        fisher_merge([a, b], [[torch.randn(2, 3)]])
    with pytest.raises(IncompatibleModelsError, match="weight"):
        regmean_merge([a, nn.Linear(4, 2)], [[torch.randn(2, 3)], [torch.randn(2, 4)]])


def test_causal_lm_statistics_cover_every_linear_layer(llama_family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_family[0])
    batch = {
        "input_ids": torch.randint(0, 96, (2, 6)),
        "attention_mask": torch.ones(2, 6, dtype=torch.long),
    }
    grams = gram_matrices(model, [batch])
    assert "model.layers.0.mlp.down_proj.weight" in grams and "lm_head.weight" in grams
    for mode in ("empirical", "exact"):
        fisher = fisher_diagonal(model, [batch], mode=mode)
        assert fisher["model.layers.1.self_attn.q_proj.weight"].abs().sum() > 0


# --- two tasks of digits -----------------------------------------------------------------

TASKS = [torch.arange(0, 5), torch.arange(5, 10)]


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order][:1200], y[order][:1200], x[order][1200:], y[order][1200:]


def _train(model: nn.Module, x, y, epochs: int, lr: float) -> nn.Module:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        for i in range(0, len(x), 32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
            optimizer.step()
    return model


def _accuracy(model: nn.Module, x, y, classes) -> float:
    keep = torch.isin(y, classes)
    with torch.no_grad():
        logits = model(x[keep])[:, classes]
    return (classes[logits.argmax(1)] == y[keep]).float().mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_on_two_digit_tasks_regmean_and_fisher_beat_the_plain_average(seed, capsys, one_thread):
    torch.manual_seed(seed)
    x, y, test_x, test_y = _digits()

    def network() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    base = _train(network(), x, y, epochs=1, lr=0.01)  # pretrained once, briefly
    tuned, data = [], []
    for classes in TASKS:
        keep = torch.isin(y, classes)
        model = network()
        model.load_state_dict(base.state_dict())
        tuned.append(_train(model, x[keep], y[keep], epochs=30, lr=0.2))
        data.append([(x[keep], y[keep])])

    def mean_accuracy(state) -> float:
        model = network()
        model.load_state_dict(state)
        return sum(_accuracy(model, test_x, test_y, c) for c in TASKS) / len(TASKS)

    states = [m.state_dict() for m in tuned]
    endpoints = [mean_accuracy(s) for s in states]
    average = mean_accuracy({k: (states[0][k] + states[1][k]) / 2 for k in states[0]})
    regmean = mean_accuracy(regmean_merge(tuned, data, alpha=0.9))
    fisher = mean_accuracy(fisher_merge(tuned, data))
    others = ""
    if seed == 1:  # the variants, once
        exact = mean_accuracy(fisher_merge(tuned, data, mode="exact"))
        plain = mean_accuracy(fisher_merge(tuned, data, normalize=False))
        others = f" (exact Fisher {exact:.3f}; not normalised {plain:.3f})"
        assert exact > average + 0.02
    with capsys.disabled():
        print(
            f"\ndigits seed {seed}, mean accuracy over two tasks: fine-tunes {endpoints[0]:.3f} / "
            f"{endpoints[1]:.3f}, average {average:.3f}, regmean {regmean:.3f}, fisher {fisher:.3f}"
            + others
        )
    assert regmean > average + 0.02 and fisher > average + 0.02
