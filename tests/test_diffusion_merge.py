"""Merging Stable Diffusion checkpoints as the WebUI's users do: tiny SD1.5- and SDXL-shaped
pipelines, in the diffusers layout and as single files; weighted sum and add difference
against their formulas, block weights, a baked VAE, discard, float16, both output layouts
loaded back with diffusers; and what is refused, in one sentence, with nothing written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import write_recipe
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge_engine import load_recipe
from merge_engine.errors import IncompatibleModelsError, RecipeError, SourceError
from merge_engine.example_diffusion import (
    COMPONENTS,
    make_finetune,
    make_pipeline,
    write_single_file,
)
from merge_engine.methods import all_methods, get_method
from merge_engine.plan.planner import build_plan
from merge_engine.run.executor import write_merge
from merge_engine.sources.formats.blocks import block_names
from merge_engine.sources.formats.sd_names import convert_names
from merge_engine.sources.inspection import inspect_recipe_models


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def family(request, tmp_path_factory) -> dict:
    """A base pipeline, two fine-tunes of it and a fourth model (C of add difference), each
    as a diffusers folder and as a single file."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    base = make_pipeline(root / "base", name, seed=0)
    folders = {"base": base}
    for index, key in enumerate(("a", "b", "c")):
        folders[key] = make_finetune(base, root / key, seed=index + 1, noise=0.05)
    files = {k: write_single_file(f, root / f"{k}.safetensors", name) for k, f in folders.items()}
    return {"name": name, "diffusers": folders, "single_file": files, "root": root}


@pytest.fixture(scope="module")
def sd1_files(tmp_path_factory) -> dict[str, Path]:
    """An SD1.5 base and three fine-tunes as single files."""
    root = tmp_path_factory.mktemp("sd1-files")
    base = make_pipeline(root / "base", "sd1", seed=0)
    found = {"base": write_single_file(base, root / "base.safetensors", "sd1")}
    for index, key in enumerate("abc"):
        tuned = make_finetune(base, root / key, seed=index + 1, noise=0.05)
        found[key] = write_single_file(tuned, root / f"{key}.safetensors", "sd1")
    return found


def weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers folder (named ``component/key``) or of a single file."""
    path = Path(path)
    if path.is_file():
        return load_file(path)
    found = {}
    for file in sorted(path.glob("*/*.safetensors")):
        found.update({f"{file.parent.name}/{k}": v for k, v in load_file(file).items()})
    return found


def merge(tmp_path: Path, text: str) -> Path:
    out = tmp_path / "out"
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(write_recipe(tmp_path, text))
    write_merge(
        build_plan(recipe, inspect_recipe_models(recipe.referenced_models())),
        out,
        device="cpu",
        show_progress=False,
    )
    return out


def output_weights(out: Path, layout: str) -> dict[str, torch.Tensor]:
    return weights(out / "model.safetensors" if layout == "single_file" else out)


@pytest.mark.parametrize("layout", ["diffusers", "single_file"])
def test_weighted_sum_and_add_difference_follow_their_formulas(family, layout, tmp_path):
    src = family[layout]
    a, b, c = (weights(src[k]) for k in "abc")
    summed = merge(
        tmp_path / "sum",
        f"merge_method: linear\nmodels:\n  - model: {src['a']}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {src['b']}\n    parameters: {{weight: 0.3}}\n",
    )
    added = merge(
        tmp_path / "add",
        f"merge_method: task_arithmetic\nbase_model: {src['c']}\nmodels:\n"
        f"  - model: {src['a']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {src['b']}\n    parameters: {{weight: 0.5}}\n",
    )
    for out, formula in (
        (summed, lambda k: a[k] * 0.7 + b[k] * 0.3),  # A·(1−M) + B·M, M = 0.3
        (added, lambda k: a[k] + (b[k] - c[k]) * 0.5),  # A + (B − C)·M, M = 0.5
    ):
        merged = output_weights(out, layout)
        assert merged.keys() == a.keys()
        for name, tensor in merged.items():
            torch.testing.assert_close(tensor, formula(name), rtol=0, atol=1e-6, msg=name)


def _block_patterns(family: str) -> dict[str, dict[str, str]]:
    """Where blocks IN04, M00 and OUT02 live in each layout, written out by hand from the
    UNet's structure (SD1.5: 4 levels, attention in the first three down and last three up;
    SDXL: 3 levels, attention in the last two down and first two up)."""
    upsampler = "upsamplers.0" if family == "sd1" else "(attentions.2|upsamplers.0)"
    return {
        "single_file": {
            "IN04": r"^model\.diffusion_model\.input_blocks\.4\.",
            "M00": r"^model\.diffusion_model\.middle_block\.",
            "OUT02": r"^model\.diffusion_model\.output_blocks\.2\.",
        },
        "diffusers": {
            "IN04": r"^unet/down_blocks\.1\.(resnets|attentions)\.0\.",
            "M00": r"^unet/mid_block\.",
            "OUT02": rf"^unet/up_blocks\.0\.(resnets\.2|{upsampler})\.",
        },
    }


@pytest.mark.parametrize("layout", ["diffusers", "single_file"])
def test_block_weights_change_exactly_the_named_blocks(family, layout, tmp_path):
    src, name = family[layout], family["name"]
    blocks = block_names(name)
    row = ",".join("1" if block in ("IN04", "M00", "OUT02") else "0" for block in blocks)
    out = merge(
        tmp_path,
        f"merge_method: linear\nparameters: {{normalize: false}}\nmodels:\n"
        f"  - model: {src['a']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {src['b']}\n    parameters:\n      weight: {{blocks: '{row}'}}\n",
    )
    a = weights(src["a"])
    merged = output_weights(out, layout)
    changed = {k for k, v in merged.items() if not torch.equal(v, a[k])}
    expected = {
        k for k in a if any(re.search(p, k) for p in _block_patterns(name)[layout].values())
    }
    assert changed == expected
    assert len(expected) > 20


def test_filters_name_components_and_classes(family, tmp_path):
    src = family["diffusers"]
    a = weights(src["a"])
    for wanted, expected in (
        ("attention", lambda k: k.startswith("unet/") and ".attentions." in k),
        ("text_encoder", lambda k: k.startswith("text_encoder/")),
        ("vae", lambda k: k.startswith("vae/")),
    ):
        out = merge(
            tmp_path / wanted,
            f"merge_method: linear\nparameters: {{normalize: false}}\nmodels:\n"
            f"  - model: {src['a']}\n    parameters: {{weight: 1.0}}\n"
            f"  - model: {src['b']}\n    parameters:\n"
            f"      weight: [{{filter: {wanted}, value: 1}}, {{value: 0}}]\n",
        )
        merged = weights(out)
        changed = {k for k, v in merged.items() if not torch.equal(v, a[k])}
        assert changed == {k for k in a if expected(k)}, wanted


def _one_denoising_step(pipe, family: str) -> torch.Tensor:
    unet = pipe.unet
    latent = torch.randn(
        1, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0)
    )
    context = torch.randn(1, 4, unet.config.cross_attention_dim)
    extra = {}
    if family == "sdxl":
        text = pipe.text_encoder_2.config.projection_dim
        extra = {
            "added_cond_kwargs": {
                "text_embeds": torch.randn(1, text),
                "time_ids": torch.randn(1, 6),
            }
        }
    pipe.scheduler.set_timesteps(2)
    step = pipe.scheduler.timesteps[0]
    with torch.no_grad():
        noise = unet(latent, step, encoder_hidden_states=context, **extra).sample
    return pipe.scheduler.step(noise, step, latent).prev_sample


def test_outputs_load_with_diffusers_and_denoise(family, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class = (
        StableDiffusionPipeline if family["name"] == "sd1" else StableDiffusionXLPipeline
    )
    src = family["diffusers"]
    recipe = (
        f"merge_method: ties\nbase_model: {src['base']}\nparameters: {{density: 0.5}}\nmodels:\n"
        f"  - model: {src['a']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {src['b']}\n    parameters: {{weight: 0.5}}\n"
    )
    folder = merge(tmp_path / "folder", recipe)
    single = merge(tmp_path / "single", recipe + "output_layout: single_file\n")
    from_folder = pipeline_class.from_pretrained(folder)
    from_file = pipeline_class.from_single_file(
        str(single / "model.safetensors"), config=str(src["base"]), local_files_only=True
    )
    for pipe in (from_folder, from_file):
        assert torch.isfinite(_one_denoising_step(pipe, family["name"])).all()
    # the two layouts hold the same merge: diffusers' own loader maps the file back to it
    for component in COMPONENTS[family["name"]]:
        left = getattr(from_folder, component).state_dict()
        right = getattr(from_file, component).state_dict()
        for key, value in left.items():
            assert torch.equal(value, right[key]), f"{component}/{key}"
    with safe_open(single / "model.safetensors", "pt") as f:
        assert "merge_method: ties" in f.metadata()["mergebot_recipe"]


def test_baked_vae_is_the_vae_bit_for_bit_in_either_layout(family, tmp_path):
    from diffusers import AutoencoderKL

    files, folders = family["single_file"], family["diffusers"]
    donor = make_finetune(folders["base"], tmp_path / "vae-donor", seed=9, noise=0.1)
    vae_only = tmp_path / "vae-only"
    AutoencoderKL.from_pretrained(donor, subfolder="vae").save_pretrained(vae_only)
    expected = AutoencoderKL.from_pretrained(vae_only).state_dict()
    ldm_vae = tmp_path / "vae-ft.safetensors"  # a single-file VAE, as the WebUIs share them
    renamed, _ = convert_names(
        family["name"], {f"vae/{k}": tuple(v.shape) for k, v in expected.items()}, to="single_file"
    )
    save_file(
        {
            r.name.removeprefix("first_stage_model."): r.apply(
                [expected[r.parts[0][4:]]]
            ).contiguous()
            for r in renamed
        },
        ldm_vae,
    )
    for vae, sources, layout in (
        (vae_only, files, "single_file"),  # a diffusers VAE into single files
        (donor, folders, "diffusers"),  # a whole pipeline's VAE into pipelines
        (ldm_vae, folders, "diffusers"),  # a single-file VAE into pipelines
    ):
        out = merge(
            tmp_path / f"{layout}-{Path(vae).stem}",
            f"merge_method: linear\nvae: {vae}\nmodels:\n  - model: {sources['a']}\n"
            f"    parameters: {{weight: 1.0}}\n  - model: {sources['b']}\n"
            f"    parameters: {{weight: 1.0}}\n",
        )
        if layout == "single_file":
            baked = AutoencoderKL.from_single_file(
                str(out / "model.safetensors"),
                config=str(folders["base"]),
                subfolder="vae",
                local_files_only=True,
            ).state_dict()
        else:
            baked = AutoencoderKL.from_pretrained(out, subfolder="vae").state_dict()
        assert baked.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(baked[key], value), key


def test_discard_and_float16(family, tmp_path):
    src = family["single_file"]
    patterns = [r"^model\.diffusion_model\.output_blocks\.1\.", r"\.ln_final\.|final_layer_norm"]
    out = merge(
        tmp_path,
        f"merge_method: linear\nout_dtype: float16\ndiscard: {json.dumps(patterns)}\nmodels:\n"
        f"  - model: {src['a']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {src['b']}\n    parameters: {{weight: 1.0}}\n",
    )
    merged = weights(out / "model.safetensors")
    names = weights(src["a"]).keys()
    assert merged.keys() == {n for n in names if not any(re.search(p, n) for p in patterns)}
    assert len(merged) < len(names)
    assert {v.dtype for v in merged.values()} == {torch.float16}


def test_a_bare_state_dict_merges_by_name(tmp_path):
    """A model without a config (a scorer's weights): merged by tensor name; what needs
    transformers layers is refused."""
    generator = torch.Generator().manual_seed(0)
    models = []
    for index in range(2):
        tensors = {
            "backbone.blocks.0.proj.weight": torch.randn(4, 4, generator=generator),
            "backbone.blocks.1.proj.weight": torch.randn(4, 4, generator=generator),
            "head.weight": torch.randn(2, 4, generator=generator),
            "head.steps": torch.tensor([index], dtype=torch.int64),
        }
        (tmp_path / f"m{index}").mkdir()
        save_file(tensors, tmp_path / f"m{index}" / "model.safetensors")
        models.append(tensors)
    pair = f"  - model: {tmp_path / 'm0'}\n    parameters: {{weight: 0.25}}\n  - model: {tmp_path / 'm1'}\n    parameters: {{weight: 0.75}}\n"
    out = merge(tmp_path / "linear", f"merge_method: linear\nmodels:\n{pair}")
    merged = load_file(out / "model.safetensors")
    assert merged.keys() == models[0].keys()
    assert torch.equal(merged["head.steps"], models[0]["head.steps"])  # integers are copied
    for name in ("backbone.blocks.0.proj.weight", "head.weight"):
        torch.testing.assert_close(merged[name], 0.25 * models[0][name] + 0.75 * models[1][name])
    assert not (out / "config.json").exists()
    stacked = _refused(
        tmp_path / "slices",
        f"merge_method: passthrough\nslices:\n  - sources: [{{model: {tmp_path / 'm0'}, layer_range: [0, 1]}}]\n",
        RecipeError,
    )
    assert stacked == (
        f"slices: frankenmerging stacks the layers of transformers models, and {tmp_path / 'm0'} "
        "is a bare state dict; merge whole models under 'models'"
    )
    aligned = _refused(
        tmp_path / "align",
        f"merge_method: linear\nalign: {{method: weight_matching}}\nmodels:\n{pair}",
        RecipeError,
    )
    assert aligned == (
        f"align: alignment permutes the hidden units of transformers models, and {tmp_path / 'm0'} "
        "is a bare state dict; remove 'align'"
    )


def _refused(tmp_path: Path, text: str, error: type) -> str:
    out = tmp_path / "out"
    with pytest.raises(error) as caught:
        merge(tmp_path, text)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    return str(caught.value)


def test_bad_input_is_one_sentence_and_nothing_is_written(family, tmp_path):
    files, folders, name = family["single_file"], family["diffusers"], family["name"]
    two = f"  - model: {files['a']}\n    parameters: {{weight: 1.0}}\n  - model: {files['b']}\n    parameters: {{weight: 1.0}}\n"
    count = len(block_names(name))
    label = "SD1.5" if name == "sd1" else "SDXL"

    mixed = _refused(
        tmp_path / "mixed",
        f"merge_method: linear\nmodels:\n  - model: {files['a']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {folders['b']}\n    parameters: {{weight: 1}}\n",
        IncompatibleModelsError,
    )
    assert (
        f"the recipe mixes layouts: {files['a']} is {label} (single file) but {folders['b']} is {label} (diffusers)"
        in mixed
    )

    sd3 = tmp_path / "sd3.safetensors"
    save_file(
        {
            "model.diffusion_model.joint_blocks.0.x.weight": torch.zeros(2),
            "text_encoders.clip_g.w": torch.zeros(2),
        },
        sd3,
    )
    unknown = _refused(
        tmp_path / "sd3",
        f"merge_method: linear\nmodels:\n  - model: {sd3}\n    parameters: {{weight: 1}}\n"
        f"  - model: {files['a']}\n    parameters: {{weight: 1}}\n",
        SourceError,
    )
    assert unknown == (
        f"{sd3} is SD3 checkpoint, which mergebot does not merge; it merges SD1.5 and SDXL "
        "checkpoints (diffusers or single-file), transformers models, and bare safetensors state dicts"
    )

    missing_block = f"IN{count // 2:02}"  # one past the last input block
    no_block = _refused(
        tmp_path / "block",
        f"merge_method: linear\nparameters:\n  weight: [{{filter: {missing_block}, value: 0.5}}, {{value: 1}}]\nmodels:\n{two}",
        RecipeError,
    )
    assert no_block.startswith(
        f"parameters.weight[0].filter: {label} (single file) has no block {missing_block}; its blocks are BASE, IN00,"
    )

    wrong_count = _refused(
        tmp_path / "count",
        f"merge_method: linear\nmodels:\n  - model: {files['a']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {files['b']}\n    parameters:\n      weight: {{blocks: {[0.5] * (count - 1)}}}\n",
        RecipeError,
    )
    assert wrong_count == (
        f"models[1].parameters.weight.blocks: has {count - 1} block values, but {label} (single file) "
        f"needs {count}, one per block in this order: {', '.join(block_names(name))}"
    )

    from diffusers import AutoencoderKL

    narrow = tmp_path / "narrow-vae"
    AutoencoderKL(
        block_out_channels=(4, 4),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=2,
        latent_channels=4,
    ).save_pretrained(narrow)
    misfit = _refused(
        tmp_path / "vae",
        f"merge_method: linear\nvae: {narrow}\nmodels:\n{two}",
        IncompatibleModelsError,
    )
    assert re.fullmatch(
        rf"vae {narrow} (does not fit: its first_stage_model\.\S+ has shape \[.*\], the models' \[.*\]|has no tensor first_stage_model\.\S+, which the models' VAE has); bake a VAE made for this model family",
        misfit,
    ), misfit

    franken = _refused(
        tmp_path / "slices",
        f"merge_method: passthrough\nslices:\n  - sources: [{{model: {files['a']}, layer_range: [0, 2]}}]\n",
        RecipeError,
    )
    assert franken == (
        f"slices: frankenmerging stacks the layers of transformers models, and {files['a']} is "
        f"{label} (single file); merge whole models under 'models'"
    )


def _required_value(param) -> float:
    """A value inside the parameter's range: the middle of its bounds, else 0.5."""
    low = param.low if param.low is not None else 0.0
    high = param.high if param.high is not None else 1.0
    return round((low + high) / 2, 3)


@pytest.mark.parametrize(
    "method",
    sorted(
        m.name
        for m in all_methods()
        if not m.needs_data and not m.layer_stacking and m.name not in ("linear", "task_arithmetic")
    ),
)
def test_every_method_without_layer_arithmetic_merges_single_files(method, sd1_files, tmp_path):
    """Each registered method that works tensor by tensor merges SD1.5 single files into a
    single file with every tensor, finite."""
    spec = get_method(method)
    count = spec.max_inputs if spec.max_inputs is not None else max(spec.min_inputs, 2)
    members = [sd1_files[k] for k in "abc"][:count]
    lines = [f"merge_method: {method}", "random_seed: 0"]
    if spec.base != "unused":  # listed among the models, as mergekit's slerp recipes do
        lines.append(f"base_model: {sd1_files['base']}")
        members = [sd1_files["base"], *members]
    lines.append("models:")
    for model in members:
        values = {p.name: _required_value(p) for p in spec.per_model_params if p.required}
        lines.append(f"  - model: {model}\n    parameters: {json.dumps(values)}")
    shared = {p.name: _required_value(p) for p in spec.global_params if p.required}
    if shared:
        lines.append(f"parameters: {json.dumps(shared)}")
    out = merge(tmp_path, "\n".join(lines) + "\n")
    merged = load_file(out / "model.safetensors")
    first = load_file(sd1_files["a"])
    assert merged.keys() == first.keys()
    assert all(torch.isfinite(v).all() for v in merged.values())


def test_a_search_over_diffusion_models_is_refused_by_name(sd1_files):
    from merge_engine.evolve.checks import check_spec
    from merge_engine.evolve.spec import spec_from_text

    spec = spec_from_text(
        f"space: parameters\nmodels: [{{model: {sd1_files['a']}}}, {{model: {sd1_files['b']}}}]\n"
        "parameters: {method: linear}\nbudget: {trials: 4, population: 4}\n"
        "fitness:\n  - {name: t, kind: nll, data: {examples: [{text: a b}]}}\n"
    )
    with pytest.raises(RecipeError) as caught:
        check_spec(spec)
    assert str(caught.value) == (
        f"models[0].model: {sd1_files['a']} is SD1.5 (single file); a search runs its models on "
        "text tasks, which mergebot does for causal LMs and sequence classifiers"
    )
