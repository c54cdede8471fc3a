"""Merging with data: RegMean and Fisher merging against independent computations, their
fallbacks, and a small network fine-tuned on two tasks of scikit-learn's digits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merge_engine.data_merge import fisher_merge, regmean_merge
from merge_engine.errors import IncompatibleModelsError, MergeError
from merge_engine.stats import fisher_diagonal, gram_matrices, load_stats, save_stats


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


def test_fisher_merging_weights_each_entry_by_its_fisher():
    models = [nn.Linear(3, 2) for _ in range(2)]
    fishers = [fisher_diagonal(m, [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]) for m in models]
    got = fisher_merge(models, [[(torch.randn(8, 3), torch.randint(0, 2, (8,)))]] * 2)
    assert set(got) == {"weight", "bias"} and all(f["weight"].min() >= 0 for f in fishers)
    # by hand, on the Fisher each model gets from one fixed batch
    batch = [(torch.eye(3), torch.tensor([0, 1, 0]))]
    f = [fisher_diagonal(m, batch) for m in models]
    got = fisher_merge(models, [batch, batch], floor=1e-6)
    for name in ("weight", "bias"):
        fa, fb = f[0][name].clamp_min(1e-6), f[1][name].clamp_min(1e-6)
        expected = (fa * models[0].state_dict()[name] + fb * models[1].state_dict()[name]) / (
            fa + fb
        )
        assert torch.allclose(got[name], expected, atol=1e-6)


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
def test_on_two_digit_tasks_regmean_and_fisher_beat_the_plain_average(capsys):
    torch.manual_seed(1)
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
    average = mean_accuracy({k: (states[0][k] + states[1][k]) / 2 for k in states[0]})
    regmean = mean_accuracy(regmean_merge(tuned, data, alpha=0.9))
    fisher = mean_accuracy(fisher_merge(tuned, data))
    with capsys.disabled():
        print(
            f"\ndigits, mean accuracy over two tasks: average {average:.3f}, regmean {regmean:.3f}, fisher {fisher:.3f}"
        )
    assert regmean > average + 0.02 and fisher > average + 0.02
