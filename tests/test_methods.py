"""Each merge method against an independent reference computation written here (NumPy, float64,
sorts where the engine selects), through the engine's in-memory API on random tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from merge_engine import build_plan, merge_models, parse_recipe
from merge_engine.methods import all_methods
from merge_engine.recipe.schema import ModelReference
from merge_engine.run.executor import iter_merged
from merge_engine.sources.inspection import ModelSource
from merge_engine.sources.tensors import TensorInfo

SHAPE = (24, 40)


def states(count: int, seed: int = 0, scale: float = 0.1) -> tuple[dict, list[dict]]:
    """A base state dict and ``count`` fine-tunes = base + a random task vector."""
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(SHAPE, generator=g), "b": torch.randn(SHAPE[1], generator=g)}
    tuned = [
        {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
        for _ in range(count)
    ]
    return base, tuned


def np_(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def close(actual: torch.Tensor, expected: np.ndarray, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(actual.double().numpy(), expected, rtol=tol, atol=tol)


def top_k_mask(x: np.ndarray, density: float) -> np.ndarray:
    k = max(1, int(density * x.size))
    order = np.argsort(-np.abs(x).ravel(), kind="stable")
    mask = np.zeros(x.size, bool)
    mask[order[:k]] = True
    return mask.reshape(x.shape)


def ties_reference(base, tuned, weights, densities, normalize=True):
    deltas = [
        w * (np_(t) - np_(base)) * top_k_mask(np_(t) - np_(base), d)
        for t, w, d in zip(tuned, weights, densities, strict=False)
    ]
    elected = np.where(sum(deltas) >= 0, 1.0, -1.0)
    agree = [np.sign(d) == elected for d in deltas]
    mixed = sum(d * a for d, a in zip(deltas, agree, strict=False))
    divisor = sum(w * a for w, a in zip(weights, agree, strict=False))
    divisor = np.where(divisor == 0, 1.0, divisor)
    return np_(base) + (mixed / divisor if normalize else mixed)


def test_registry_lists_every_mergekit_method():
    expected = {
        "linear",
        "slerp",
        "nuslerp",
        "multislerp",
        "karcher",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "sce",
        "ram",
        "ramplus_tl",
        "model_stock",
        "nearswap",
        "arcee_fusion",
        "passthrough",
    }
    with_data = {"fisher", "regmean"}
    assert {m.name for m in all_methods()} == expected | with_data
    assert {m.name for m in all_methods() if m.needs_data} == with_data


def test_linear_is_the_normalised_weighted_average():
    _, tuned = states(3)
    out = merge_models(
        tuned, "linear", model_parameters=[{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}]
    )
    for key in ("w", "b"):
        close(
            out[key], (np_(tuned[0][key]) + 2 * np_(tuned[1][key]) + 0.5 * np_(tuned[2][key])) / 3.5
        )


def test_linear_without_normalize_is_the_weighted_sum():
    _, tuned = states(2)
    out = merge_models(tuned, "linear", parameters={"weight": 0.75, "normalize": False})
    close(out["w"], 0.75 * (np_(tuned[0]["w"]) + np_(tuned[1]["w"])))


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_follows_the_great_circle(t):
    base, (other,) = states(1, scale=1.0)
    out = merge_models([other], "slerp", base=base, parameters={"t": t})
    a, b = np_(base["w"]).ravel(), np_(other["w"]).ravel()
    omega = math.acos(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b)))
    expected = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
    close(out["w"], expected.reshape(SHAPE))


def test_slerp_falls_back_to_lerp_for_nearly_parallel_tensors():
    base = {"w": torch.ones(SHAPE)}
    other = {"w": torch.ones(SHAPE) * 2}
    out = merge_models([other], "slerp", base=base, parameters={"t": 0.25})
    close(out["w"], np.full(SHAPE, 1.25))


def test_slerp_gradient_over_layers_interpolates_t():
    g = torch.Generator().manual_seed(3)
    base = {f"model.layers.{i}.w": torch.randn(8, 8, generator=g) for i in range(3)}
    other = {k: torch.randn(8, 8, generator=g) for k in base}
    out = merge_models([other], "slerp", base=base, parameters={"t": [0.0, 1.0]})
    close(out["model.layers.0.w"], np_(base["model.layers.0.w"]))
    close(out["model.layers.2.w"], np_(other["model.layers.2.w"]))
    middle = np_(out["model.layers.1.w"])
    a, b = np_(base["model.layers.1.w"]), np_(other["model.layers.1.w"])
    assert not np.allclose(middle, a) and not np.allclose(middle, b)


def test_a_gradient_gives_the_embeddings_its_first_value_and_the_head_its_last():
    """As mergekit plans them: tensors before the layers at t=0, the final norm and the head
    (after the layers) at t=1, not every tensor outside the layers at 0."""
    g = torch.Generator().manual_seed(4)
    names = ["model.embed_tokens.weight", "model.layers.0.w", "model.layers.1.w"]
    names += ["model.norm.weight", "lm_head.weight"]
    base = {n: torch.randn(8, 8, generator=g) for n in names}
    other = {n: torch.randn(8, 8, generator=g) for n in names}
    out = merge_models([other], "slerp", base=base, parameters={"t": [0.0, 1.0]})
    close(out["model.embed_tokens.weight"], np_(base["model.embed_tokens.weight"]))
    close(out["model.norm.weight"], np_(other["model.norm.weight"]))
    close(out["lm_head.weight"], np_(other["lm_head.weight"]))

    # The same in a slices recipe: the first slice's start, the last slice's end.
    sources = {
        ModelReference(ref): ModelSource(
            ModelReference(ref),
            {},
            {n: TensorInfo(tuple(t.shape), t.dtype, "memory") for n, t in state.items()},
            memory=state,
        )
        for ref, state in [("base", base), ("other", other)]
    }
    sliced = {
        "merge_method": "slerp",
        "base_model": "base",
        "parameters": {"t": [0.0, 1.0]},
        "slices": [
            {"sources": [{"model": m, "layer_range": [i, i + 1]} for m in ("base", "other")]}
            for i in range(2)
        ],
    }
    plan = build_plan(parse_recipe(sliced), sources)
    out = {task.output: tensor for task, tensor in iter_merged(plan, torch.device("cpu"))}
    close(out["model.embed_tokens.weight"], np_(base["model.embed_tokens.weight"]))
    close(out["lm_head.weight"], np_(other["lm_head.weight"]))


def test_task_arithmetic_adds_and_negates_task_vectors():
    base, (a, b) = states(2)
    out = merge_models(
        [a, b], "task_arithmetic", base=base, model_parameters=[{"weight": 1.0}, {"weight": -0.5}]
    )
    close(
        out["w"],
        np_(base["w"]) + (np_(a["w"]) - np_(base["w"])) - 0.5 * (np_(b["w"]) - np_(base["w"])),
    )


def test_task_arithmetic_lambda_scales_the_sum():
    base, (a,) = states(1)
    out = merge_models(
        [a], "task_arithmetic", base=base, parameters={"weight": 1.0, "lambda": 0.25}
    )
    close(out["w"], np_(base["w"]) + 0.25 * (np_(a["w"]) - np_(base["w"])))


@pytest.mark.parametrize("densities", [(0.5, 0.5, 0.5), (0.2, 0.6, 1.0)])
def test_ties_trims_elects_and_averages_agreeing_deltas(densities):
    base, tuned = states(3, seed=4)
    weights = [1.0, 0.6, 0.3]
    out = merge_models(
        tuned,
        "ties",
        base=base,
        model_parameters=[
            {"weight": w, "density": d} for w, d in zip(weights, densities, strict=False)
        ],
    )
    for key in ("w", "b"):
        close(out[key], ties_reference(base[key], [t[key] for t in tuned], weights, densities))


def test_ties_without_normalize_sums_the_agreeing_deltas():
    base, tuned = states(2, seed=5)
    out = merge_models(
        tuned, "ties", base=base, parameters={"weight": 1.0, "density": 0.4, "normalize": False}
    )
    close(
        out["w"],
        ties_reference(base["w"], [t["w"] for t in tuned], [1.0, 1.0], [0.4, 0.4], normalize=False),
    )


def breadcrumbs_mask(x: np.ndarray, density: float, gamma: float) -> np.ndarray:
    n = x.size
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    order = np.argsort(np.abs(x).ravel(), kind="stable")
    mask = np.zeros(n, bool)
    mask[order[bottom : bottom + target]] = True
    return mask.reshape(x.shape)


def test_breadcrumbs_drops_outliers_and_small_entries():
    base, tuned = states(2, seed=6)
    out = merge_models(
        tuned, "breadcrumbs", base=base, parameters={"weight": 0.5, "density": 0.6, "gamma": 0.1}
    )
    deltas = [np_(t["w"]) - np_(base["w"]) for t in tuned]
    expected = np_(base["w"]) + sum(0.5 * d * breadcrumbs_mask(d, 0.6, 0.1) for d in deltas)
    close(out["w"], expected)


def test_breadcrumbs_ties_applies_sign_consensus():
    base, tuned = states(2, seed=7)
    out = merge_models(
        tuned,
        "breadcrumbs_ties",
        base=base,
        parameters={"weight": 1.0, "density": 0.5, "gamma": 0.05},
    )
    deltas = [(np_(t["w"]) - np_(base["w"])) for t in tuned]
    kept = [d * breadcrumbs_mask(d, 0.5, 0.05) for d in deltas]
    elected = np.where(sum(kept) >= 0, 1.0, -1.0)
    expected = np_(base["w"]) + sum(
        k * (np.sign(k) == elected) for k in kept
    )  # normalize defaults to false
    close(out["w"], expected)


def test_dare_linear_keeps_about_density_and_matches_the_l1_norm():
    g = torch.Generator().manual_seed(8)
    base = {"w": torch.zeros(200, 200)}
    tuned = {"w": torch.randn(200, 200, generator=g)}
    out = merge_models(
        [tuned], "dare_linear", base=base, parameters={"weight": 1.0, "density": 0.3}, seed=1
    )
    result, delta = np_(out["w"]), np_(tuned["w"])
    kept = result != 0
    assert abs(kept.mean() - 0.3) < 0.01  # 40,000 Bernoulli draws: 5 sigma is 0.0115
    ratios = result[kept] / delta[kept]
    np.testing.assert_allclose(ratios, np.abs(delta).sum() / np.abs(delta[kept]).sum(), rtol=1e-4)


def test_dare_rescale_mode_inverse_density_divides_by_the_keep_probability():
    g = torch.Generator().manual_seed(9)
    base = {"w": torch.zeros(100, 100)}
    tuned = {"w": torch.randn(100, 100, generator=g)}
    out = merge_models(
        [tuned],
        "dare_linear",
        base=base,
        parameters={"weight": 1.0, "density": 0.25, "rescale_mode": "inverse_density"},
        seed=2,
    )
    result, delta = np_(out["w"]), np_(tuned["w"])
    kept = result != 0
    np.testing.assert_allclose(result[kept], delta[kept] / 0.25, rtol=1e-5)


def test_dare_ties_is_reproducible_under_a_seed_and_differs_across_seeds():
    base, tuned = states(2, seed=10)

    def run(seed):
        return merge_models(
            tuned, "dare_ties", base=base, parameters={"weight": 1.0, "density": 0.5}, seed=seed
        )["w"]

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_della_keeps_large_entries_more_often():
    g = torch.Generator().manual_seed(11)
    base = {"w": torch.zeros(64, 400)}
    tuned = {"w": torch.randn(64, 400, generator=g)}
    out = merge_models(
        [tuned],
        "della_linear",
        base=base,
        parameters={"weight": 1.0, "density": 0.5, "epsilon": 0.4, "rescale": False},
        seed=3,
    )
    result, delta = np_(out["w"]), np_(tuned["w"])
    kept = result != 0
    np.testing.assert_allclose(
        result[kept], delta[kept], rtol=1e-6
    )  # no rescale: kept entries unchanged
    ranks = np.argsort(np.argsort(np.abs(delta), axis=1), axis=1) / 399
    # keep probability is 0.1 + 0.8 * rank: the smallest fifth ~0.18, the largest fifth ~0.82
    assert abs(kept[ranks < 0.2].mean() - 0.18) < 0.03
    assert abs(kept[ranks > 0.8].mean() - 0.82) < 0.03
    assert abs(kept.mean() - 0.5) < 0.02


def test_model_stock_interpolates_by_the_offsets_angle():
    base, tuned = states(3, seed=12)
    out = merge_models(tuned, "model_stock", base=base)
    w0 = np_(base["w"]).ravel()
    offsets = [np_(t["w"]).ravel() - w0 for t in tuned]
    cos = np.mean(
        [
            np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
            for i, a in enumerate(offsets)
            for b in offsets[i + 1 :]
        ]
    )
    t = 3 * cos / (1 + 2 * cos)
    expected = t * np.mean([np_(x["w"]) for x in tuned], axis=0) + (1 - t) * np_(base["w"])
    close(out["w"], expected)


def test_nearswap_takes_the_other_value_only_where_close():
    base = {"w": torch.zeros(4)}
    other = {"w": torch.tensor([0.001, 0.01, 0.5, -2.0])}
    out = merge_models([other], "nearswap", base=base, parameters={"t": 0.1})
    # weight = clamp(t / |a - b|, 0, 1): 1, 1, 0.2, 0.05
    close(out["w"], np.array([0.001, 0.01, 0.2 * 0.5, 0.05 * -2.0]))


def test_arcee_fusion_keeps_only_important_changes():
    base, (other,) = states(1, seed=13)
    out = merge_models([other], "arcee_fusion", base=base)
    a, b = np_(base["w"]), np_(other["w"])

    def softmax(x):
        return np.exp(x - x.max(-1, keepdims=True)) / np.exp(x - x.max(-1, keepdims=True)).sum(
            -1, keepdims=True
        )

    p, q = softmax(b) + 1e-8, softmax(a) + 1e-8
    importance = np.abs(b - a) * (p * np.log(p / q)).sum(-1, keepdims=True)
    s = np.sort(importance.ravel())
    q1, med, q3 = (s[int(x * (s.size - 1))] for x in (0.25, 0.5, 0.75))
    mask = importance >= med + 1.5 * (q3 - q1)
    assert 0 < mask.sum() < mask.size
    close(out["w"], a + (b - a) * mask, tol=1e-4)


def test_ram_keeps_unique_changes_and_averages_overlaps():
    base = {"w": torch.zeros(4)}
    a = {"w": torch.tensor([1.0, 0.0, 2.0, 0.0])}
    b = {"w": torch.tensor([0.0, 3.0, 4.0, 0.0])}
    out = merge_models([a, b], "ram", base=base)
    close(out["w"], np.array([1.0, 3.0, 3.0, 0.0]))


def test_ramplus_boosts_unique_changes_by_the_overlap_ratio():
    base = {"w": torch.zeros(4)}
    a = {"w": torch.tensor([1.0, 0.0, 2.0, 0.0])}
    b = {"w": torch.tensor([0.0, 3.0, 4.0, 5.0])}
    out = merge_models([a, b], "ramplus_tl", base=base, parameters={"r": 0.5, "alpha": 0.4})
    # a: 1 shared / 1 unique -> rho 1 -> boost 1 + 0.5 * min(1, 0.4) = 1.2; b: 1 shared / 2 unique -> 0.5 -> 1.2
    close(out["w"], np.array([1.2, 3.6, 3.0, 6.0]))


def test_sce_weights_by_energy_after_selection_and_sign_erasure():
    base, tuned = states(3, seed=14)
    out = merge_models(tuned, "sce", base=base, parameters={"select_topk": 0.5})
    tv = np.stack([np_(t["w"]) - np_(base["w"]) for t in tuned])
    var = tv.var(axis=0)
    k = int(np.count_nonzero(var) * 0.5)
    mask = np.zeros(var.size, bool)
    mask[np.argsort(-var.ravel(), kind="stable")[:k]] = True
    tv = tv * mask.reshape(var.shape)
    energy = (tv**2).reshape(3, -1).mean(1)
    weights = energy / energy.sum()
    elected = np.where(tv.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(tv) == elected
    w = weights[:, None, None] * agree
    expected = np_(base["w"]) + (tv * w).sum(0) / np.maximum(w.sum(0), 1e-6)
    close(out["w"], expected)


def test_nuslerp_with_a_base_slerps_the_task_vectors():
    base, (a, b) = states(2, seed=15)
    out = merge_models(
        [a, b], "nuslerp", base=base, model_parameters=[{"weight": 1.0}, {"weight": 3.0}]
    )
    t = 0.75
    u, v = (np_(a["w"]) - np_(base["w"])).ravel(), (np_(b["w"]) - np_(base["w"])).ravel()
    omega = math.acos(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))
    expected = np_(base["w"]).ravel() + (
        math.sin((1 - t) * omega) * u + math.sin(t * omega) * v
    ) / math.sin(omega)
    close(out["w"], expected.reshape(SHAPE))


def test_karcher_mean_of_two_is_the_geodesic_midpoint_at_the_mean_norm():
    _, (a, b) = states(2, seed=16, scale=1.0)
    out = merge_models([a, b], "karcher", parameters={"max_iter": 50, "tol": 1e-9})
    x, y = np_(a["w"]).ravel(), np_(b["w"]).ravel()
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    midpoint = x / nx + y / ny
    expected = (nx + ny) / 2 * midpoint / np.linalg.norm(midpoint)
    close(out["w"], expected.reshape(SHAPE), tol=1e-4)


def test_multislerp_of_two_equal_weights_lies_on_the_bisector_at_the_mean_norm():
    _, (a, b) = states(2, seed=17, scale=1.0)
    out = merge_models([a, b], "multislerp", parameters={"weight": 1.0})
    x, y = np_(a["w"]).ravel(), np_(b["w"]).ravel()
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    bisector = x / nx + y / ny
    expected = (nx + ny) / 2 * bisector / np.linalg.norm(bisector)
    close(out["w"], expected.reshape(SHAPE), tol=1e-4)


def test_passthrough_copies_and_scales():
    _, (a,) = states(1)
    out = merge_models([a], "passthrough", parameters={"scale": 0.5})
    close(out["w"], 0.5 * np_(a["w"]))


def test_integer_buffers_are_copied_not_averaged():
    _, (a, b) = states(2)
    a = {**a, "ids": torch.arange(6)}
    b = {**b, "ids": torch.arange(6) * 7}
    out = merge_models([a, b], "linear", parameters={"weight": 1.0})
    assert torch.equal(out["ids"], torch.arange(6))


def test_bfloat16_inputs_merge_in_bfloat16_unless_dtype_says_otherwise():
    base, tuned = states(2)
    tuned16 = [{k: v.bfloat16() for k, v in t.items()} for t in tuned]
    assert merge_models(tuned16, "linear", parameters={"weight": 1.0})["w"].dtype == torch.bfloat16
    out = merge_models(tuned16, "linear", parameters={"weight": 1.0}, dtype="float32")
    assert out["w"].dtype == torch.float32
    close(out["w"], (np_(tuned16[0]["w"]) + np_(tuned16[1]["w"])) / 2)


def test_slerp_extrapolates_outside_zero_one():
    base, (other,) = states(1, seed=18, scale=1.0)
    out = merge_models([other], "slerp", base=base, parameters={"t": 1.5})
    a, b = np_(base["w"]).ravel(), np_(other["w"]).ravel()
    omega = math.acos(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b)))
    expected = (math.sin(-0.5 * omega) * a + math.sin(1.5 * omega) * b) / math.sin(omega)
    close(out["w"], expected.reshape(SHAPE))


def test_nearswap_with_t_zero_keeps_the_base_and_bools_accept_zero_one():
    base, (other,) = states(1)
    assert torch.equal(
        merge_models([other], "nearswap", base=base, parameters={"t": 0})["w"], base["w"]
    )
    _, tuned = states(2)
    summed = merge_models(tuned, "linear", parameters={"weight": 1.0, "normalize": 0})
    close(summed["w"], np_(tuned[0]["w"]) + np_(tuned[1]["w"]))


@pytest.mark.parametrize(
    "method", ["della", "della_linear", "dare_ties", "ties", "arcee_fusion", "sce"]
)
def test_scalar_and_empty_tensors_merge_without_error(method):
    base = {"scalar": torch.tensor(0.5), "empty": torch.zeros(0, 4), "w": torch.zeros(3, 4)}
    tuned = {"scalar": torch.tensor(0.7), "empty": torch.zeros(0, 4), "w": torch.ones(3, 4)}
    parameters = {"weight": 1.0, "density": 0.5} if method not in ("arcee_fusion", "sce") else {}
    out = merge_models([tuned], method, base=base, parameters=parameters, seed=0)
    assert out["empty"].shape == (0, 4)
    assert out["scalar"].shape == ()


def test_integer_parameters_round_an_interpolated_gradient():
    _, (a, b) = states(2, seed=19, scale=1.0)
    layered = [{f"model.layers.{i}.w": t["w"] for i in range(3)} for t in (a, b)]
    sources = {}
    for i, state in enumerate(layered):
        ref = (
            parse_recipe({"merge_method": "karcher", "models": [{"model": f"org/m{i}"}]})
            .models[0]
            .model
        )
        infos = {n: TensorInfo(tuple(v.shape), v.dtype, "m") for n, v in state.items()}
        sources[ref] = ModelSource(ref, {}, infos, memory=state)
    recipe = parse_recipe(
        {
            "merge_method": "karcher",
            "models": [{"model": "org/m0"}, {"model": "org/m1"}],
            "parameters": {"max_iter": [4, 7]},
        }
    )
    assert [task.shared["max_iter"] for task in build_plan(recipe, sources).tasks] == [
        4,
        round(5.5),
        7,
    ]
