"""Diffusion LoRAs baked into SD1.5/SDXL checkpoints, against diffusers' own ``load_lora_weights``
+ ``fuse_lora``: LoRAs made by PEFT on tiny pipelines (random, non-zero A and B), saved in
diffusers' names and in kohya's (diffusers' converter, SDXL's UNet renamed to the LDM names
sd-scripts writes), baked at a strength into both checkpoint layouts; block strengths; two
LoRAs at once; and what is refused, in one sentence, before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from merge_engine import merge, preflight
from merge_engine.errors import IncompatibleModelsError, RecipeError, SourceError
from merge_engine.example_diffusion import COMPONENTS, make_pipeline, write_single_file
from merge_engine.recipe.schema import parse_recipe
from merge_engine.sources.formats.blocks import block_names, single_file_names
from merge_engine.sources.formats.layouts import Layout, component_tensor_name
from merge_engine.sources.formats.sd_names import convert_names

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]
TEXT_TARGETS = ["q_proj", "out_proj", "fc1", "fc2"]
TEXT_ENCODERS = {"sd1": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}


def peft_lora(folder: Path, seed: int, text_targets=TEXT_TARGETS) -> dict[str, torch.Tensor]:
    """A LoRA made with PEFT on the pipeline at ``folder``, in diffusers' names (``unet.…``,
    ``text_encoder.…``): rank 4 on the UNet (LoCon's 3x3 convolutions included), 2 on the text
    encoders, every matrix random and non-zero."""
    torch.manual_seed(seed)
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS, init_lora_weights=False)
    )
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()}
    for name in ("text_encoder", "text_encoder_2"):
        if hasattr(pipe, name):
            encoder = getattr(pipe, name)
            config = LoraConfig(
                r=2, lora_alpha=2, target_modules=text_targets, init_lora_weights=False
            )
            encoder.add_adapter(config)
            state |= {f"{name}.{k}": v for k, v in get_peft_model_state_dict(encoder).items()}
    return {k: v.detach().contiguous() for k, v in state.items()}


def kohya(state: dict[str, torch.Tensor], alpha: float, family: str) -> dict[str, torch.Tensor]:
    """``state`` in kohya's names (diffusers' converter, the text encoders' ``text_model_``
    and SD1.5's ``lora_te_`` as sd-scripts writes them), every module's alpha ``alpha``
    (diffusers maps one alpha per file correctly; one per module it mixes up)."""
    found = convert_state_dict_to_kohya(dict(state))
    single = "lora_te_" if family == "sd1" else "lora_te1_"
    out = {}
    for key, value in found.items():
        for prefix, kohya_prefix in (("lora_te1_", single), ("lora_te2_", "lora_te2_")):
            if key.startswith(prefix) and not key.startswith(f"{prefix}text_model_"):
                key = f"{kohya_prefix}text_model_{key.removeprefix(prefix)}"
        out[key] = torch.tensor(alpha) if key.endswith(".alpha") else value.contiguous()
    return out


def ldm_unet_names(state: dict[str, torch.Tensor], folder: Path, family: str) -> dict:
    """A kohya LoRA's UNet modules under their LDM paths (``lora_unet_input_blocks_4_1_…``), as
    sd-scripts names an SDXL LoRA: the pipeline's own name map."""
    unet = load_file(next((folder / "unet").glob("*.safetensors")))
    renamed, _ = convert_names(
        family, {f"unet/{k}": tuple(v.shape) for k, v in unet.items()}, to="single_file"
    )
    ldm = {}
    for r in renamed:
        diffusers = r.parts[0].removeprefix("unet/").removesuffix(".weight").replace(".", "_")
        single = r.name.removeprefix("model.diffusion_model.").removesuffix(".weight")
        ldm[f"lora_unet_{diffusers}"] = f"lora_unet_{single.replace('.', '_')}"
    out = {}
    for key, value in state.items():
        module, _, suffix = key.partition(".")
        out[f"{ldm.get(module, module)}.{suffix}"] = value
    return out


def component_weights(folder: Path, family: str) -> dict[str, torch.Tensor]:
    """A pipeline folder's tensors named as mergebot names them (``unet/…``)."""
    found = {}
    for component in COMPONENTS[family]:
        for key, value in load_file(next((folder / component).glob("*.safetensors"))).items():
            found[component_tensor_name(component, key)] = value
    return found


def diffusers_fused(
    folder: Path, family: str, loras: list[tuple[Path, float]], dtype=torch.float32
) -> dict:
    """The pipeline with each LoRA loaded by diffusers and fused at its strength, in order."""
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
    for path, strength in loras:
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=strength)
        pipe.unload_lora_weights()
    found = {}
    for component in COMPONENTS[family]:
        for key, value in getattr(pipe, component).state_dict().items():
            found[component_tensor_name(component, key)] = value.detach()
    return found


def as_single_file(tensors: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    renamed, _ = convert_names(
        family, {k: tuple(v.shape) for k, v in tensors.items()}, "single_file"
    )
    return {r.name: r.apply([tensors[p] for p in r.parts]) for r in renamed}


def bake(tmp: Path, checkpoint: Path, loras: list[dict]) -> dict[str, torch.Tensor]:
    """``checkpoint`` with ``loras`` baked, merged alone (linear, weight 1) and read back."""
    recipe = parse_recipe(
        {
            "merge_method": "linear",
            "models": [{"model": str(checkpoint), "parameters": {"weight": 1.0}, "loras": loras}],
        }
    )
    out = tmp / "baked"
    merge(preflight(recipe), out)
    if checkpoint.suffix == ".safetensors":
        return load_file(next(out.glob("*.safetensors")))
    family = "sdxl" if (out / "text_encoder_2").is_dir() else "sd1"
    return component_weights(out, family)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    worst = max((got[k].double() - want[k].double()).abs().max().item() for k in want)
    assert worst <= 1e-6, worst


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def pipeline(request, tmp_path_factory) -> dict:
    """A tiny pipeline as a folder and a single file, and LoRAs made for it: in diffusers'
    names, in kohya's (alpha 3 for rank 4 and 2), and a second kohya LoRA."""
    family = request.param
    root = tmp_path_factory.mktemp(f"lora-{family}")
    folder = make_pipeline(root / "base", family, seed=0)
    single = write_single_file(folder, root / "base.safetensors", family)
    first, second = peft_lora(folder, seed=1), peft_lora(folder, seed=2)
    files = {"diffusers": root / "peft.safetensors"}
    save_file(
        peft_lora(folder, seed=3, text_targets=["q_proj", "v_proj", "fc1"]), files["diffusers"]
    )
    for name, state in (("kohya", first), ("second", second)):
        found = kohya(state, alpha=3.0, family=family)
        if family == "sdxl":  # sd-scripts trains SDXL on the LDM UNet and names it so
            found = ldm_unet_names(found, folder, family)
        files[name] = root / f"{name}.safetensors"
        save_file(found, files[name])
    return {"family": family, "folder": folder, "single": single, "files": files}


@pytest.mark.parametrize("layout", ["diffusers", "single_file"])
def test_kohya_lora_baked_at_a_strength_equals_diffusers_fuse_lora(pipeline, layout, tmp_path):
    family, folder = pipeline["family"], pipeline["folder"]
    lora = pipeline["files"]["kohya"]
    want = diffusers_fused(folder, family, [(lora, 0.7)])
    checkpoint = folder if layout == "diffusers" else pipeline["single"]
    got = bake(tmp_path, checkpoint, [{"lora": str(lora), "strength": 0.7}])
    assert_same(got, want if layout == "diffusers" else as_single_file(want, family))
    base = component_weights(folder, family)
    changed = {k for k in want if not torch.equal(want[k], base[k])}
    assert any(k.startswith("unet/") and k.endswith("conv1.weight") for k in changed)  # LoCon
    assert any(k.startswith(TEXT_ENCODERS[family][-1]) for k in changed)


@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.float16])
def test_half_precision_checkpoint_equals_diffusers_fusing_in_half(pipeline, lora_dtype, tmp_path):
    """A float16 checkpoint: diffusers loads the LoRA in float16, multiplies in float32,
    rounds the update to float16 and adds it; the bake gives the same bits, for a float32
    and a float16 LoRA file alike."""
    family = pipeline["family"]
    half = tmp_path / "half"
    DiffusionPipeline.from_pretrained(
        pipeline["folder"], torch_dtype=torch.float16
    ).save_pretrained(half)
    lora = tmp_path / "lora.safetensors"
    save_file({k: v.to(lora_dtype) for k, v in load_file(pipeline["files"]["kohya"]).items()}, lora)
    want = diffusers_fused(half, family, [(lora, 0.7)], dtype=torch.float16)
    got = bake(tmp_path, half, [{"lora": str(lora), "strength": 0.7}])
    assert {v.dtype for v in got.values()} == {torch.float16}
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("layout", ["diffusers", "single_file"])
def test_diffusers_format_lora_with_text_attention_equals_diffusers(pipeline, layout, tmp_path):
    """diffusers' own names (``unet.….lora_A.weight``), the text encoders' q and v included: in
    a single-file SDXL those are rows of OpenCLIP's fused ``in_proj_weight``."""
    family, folder = pipeline["family"], pipeline["folder"]
    lora = pipeline["files"]["diffusers"]
    want = diffusers_fused(folder, family, [(lora, 1.3)])
    checkpoint = folder if layout == "diffusers" else pipeline["single"]
    got = bake(tmp_path, checkpoint, [{"lora": str(lora), "strength": 1.3}])
    assert_same(got, want if layout == "diffusers" else as_single_file(want, family))


def test_two_loras_equal_diffusers_fusing_both(pipeline, tmp_path):
    family, folder, files = pipeline["family"], pipeline["folder"], pipeline["files"]
    want = diffusers_fused(folder, family, [(files["kohya"], 0.8), (files["second"], -0.5)])
    got = bake(
        tmp_path,
        folder,
        [
            {"lora": str(files["kohya"]), "strength": 0.8},
            {"lora": str(files["second"]), "strength": -0.5},
        ],
    )
    assert_same(got, want)
    card = (tmp_path / "baked" / "README.md").read_text()
    assert "| LoRA, strength 0.8 |" in card and "| LoRA, strength -0.5 |" in card


def test_block_strengths_change_exactly_the_named_blocks(pipeline, tmp_path):
    """One block at 0.5, BASE (the text encoders) and every other block at 0: only that
    block's tensors move, by half the full bake's change; the rest is the base, bit for bit."""
    family, folder = pipeline["family"], pipeline["folder"]
    lora = str(pipeline["files"]["kohya"])
    names = block_names(family)
    chosen = "IN04" if family == "sdxl" else "OUT05"
    row = ",".join("0.5" if n == chosen else "0" for n in names)
    got = bake(tmp_path / "one", folder, [{"lora": lora, "blocks": row, "strength": 2.0}])
    full = bake(tmp_path / "full", folder, [{"lora": lora, "strength": 1.0}])
    base = component_weights(folder, family)
    layout = Layout(family, "diffusers")  # type: ignore[arg-type]
    singles = single_file_names(layout, {k: tuple(v.shape) for k, v in base.items()})
    from merge_engine.sources.formats.blocks import block_of

    in_block = {k for k in base if block_of(family, singles[k]) == chosen}
    changed = {k for k in base if not torch.equal(got[k], base[k])}
    assert changed and changed <= in_block
    assert changed == {k for k in in_block if not torch.equal(full[k], base[k])}
    for key in changed:
        torch.testing.assert_close(got[key], full[key])


def test_short_block_row_of_the_lora_block_weight_extension(pipeline, tmp_path):
    """LBW's 17-value (SD1.5) or 12-value (SDXL) row names the attention blocks; a LoRA that
    also changes a block outside it (LoCon's convolutions) is told to give the full row."""
    family, folder = pipeline["family"], pipeline["folder"]
    short = 17 if family == "sd1" else 12
    lora = str(pipeline["files"]["kohya"])
    recipe = parse_recipe(
        {
            "merge_method": "linear",
            "models": [{"model": str(folder), "loras": [{"lora": lora, "blocks": [1.0] * short}]}],
        }
    )
    with pytest.raises(RecipeError, match=rf"which a row of {short} does not name"):
        preflight(recipe)


@pytest.fixture(scope="module")
def sd1_and_sdxl(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    found = {f: make_pipeline(root / f, f, seed=0) for f in ("sd1", "sdxl")}
    found["sdxl_lora"] = root / "sdxl_lora.safetensors"
    save_file(kohya(peft_lora(found["sdxl"], seed=4), 4.0, "sdxl"), found["sdxl_lora"])
    found["sd1_lora"] = root / "sd1_lora.safetensors"
    save_file(kohya(peft_lora(found["sd1"], seed=4), 4.0, "sd1"), found["sd1_lora"])
    return found


def _refused(tmp: Path, model: Path, loras: list[dict], **recipe) -> str:
    out = tmp / "out"
    data = {"merge_method": "linear", "models": [{"model": str(model), "loras": loras}]}
    with pytest.raises((RecipeError, SourceError, IncompatibleModelsError)) as error:
        merge(preflight(parse_recipe(data | recipe)), out)
    assert not out.exists()
    message = str(error.value)
    assert message.count(". ") == 0 and "\n" not in message, message
    return message


def test_lora_for_another_family_is_refused(sd1_and_sdxl, tmp_path):
    message = _refused(tmp_path, sd1_and_sdxl["sd1"], [{"lora": str(sd1_and_sdxl["sdxl_lora"])}])
    assert "SDXL LoRA" in message and "SD1.5" in message
    message = _refused(tmp_path, sd1_and_sdxl["sdxl"], [{"lora": str(sd1_and_sdxl["sd1_lora"])}])
    assert "made for another model" in message


def test_wrong_number_of_block_strengths_is_refused(sd1_and_sdxl, tmp_path):
    lora = str(sd1_and_sdxl["sd1_lora"])
    message = _refused(tmp_path, sd1_and_sdxl["sd1"], [{"lora": lora, "blocks": "1,0,1"}])
    assert message.startswith("models[0].loras[0].blocks: has 3 block strengths")
    assert "26" in message and "17" in message


@pytest.mark.parametrize(
    ("suffixes", "kind"),
    [
        ((".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".alpha"), "LoHa"),
        ((".lokr_w1", ".lokr_w2", ".alpha"), "LoKr"),
        ((".lora_down.weight", ".lora_up.weight", ".dora_scale", ".alpha"), "DoRA"),
        ((".weight", ".on_input"), "IA3"),
        ((".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight"), "GLoRA"),
        ((".lora_down.weight", ".lora_mid.weight", ".lora_up.weight"), "CP decomposition"),
    ],
)
def test_unsupported_lycoris_types_are_refused_by_name(sd1_and_sdxl, tmp_path, suffixes, kind):
    module = "lora_unet_down_blocks_0_attentions_0_proj_in"
    path = tmp_path / "lycoris.safetensors"
    save_file({module + s: torch.ones(2, 2) for s in suffixes}, path)
    message = _refused(tmp_path, sd1_and_sdxl["sd1"], [{"lora": str(path)}])
    assert kind in message and "does not bake" in message


def test_a_module_named_twice_is_refused(sd1_and_sdxl, tmp_path):
    """One weight under its diffusers and its LDM name in one file would be applied twice."""
    pair = {".lora_down.weight": torch.ones(2, 8, 1, 1), ".lora_up.weight": torch.ones(8, 2, 1, 1)}
    path = tmp_path / "twice.safetensors"
    names = ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_input_blocks_1_1_proj_in")
    save_file({n + suffix: t.clone() for n in names for suffix, t in pair.items()}, path)
    message = _refused(tmp_path, sd1_and_sdxl["sd1"], [{"lora": str(path)}])
    assert "changes one weight twice" in message


def test_loras_on_a_transformers_model_are_refused(llama_family, sd1_and_sdxl, tmp_path):
    base, _ = llama_family
    message = _refused(tmp_path, base, [{"lora": str(sd1_and_sdxl["sd1_lora"])}])
    assert "base+adapter" in message


def test_recipe_reads_loras_and_lists_them_as_sources(sd1_and_sdxl):
    recipe = parse_recipe(
        {
            "merge_method": "linear",
            "models": [
                {
                    "model": str(sd1_and_sdxl["sd1"]),
                    "loras": [{"lora": "org/style@main", "strength": 0.8, "blocks": "1,0"}],
                }
            ],
        }
    )
    entry = recipe.models[0].loras[0]
    assert (str(entry.lora), entry.strength, entry.blocks) == ("org/style@main", 0.8, [1.0, 0.0])
    assert recipe.lora_references() == [entry.lora]
    assert entry.lora in recipe.referenced_models()
    pinned = recipe.with_revisions({entry.lora: "a" * 40})
    assert str(pinned.models[0].loras[0].lora) == f"org/style@{'a' * 40}"
    with pytest.raises(RecipeError, match=r"models\[0\]\.loras\[0\]\.strength"):
        parse_recipe(
            {
                "merge_method": "linear",
                "models": [{"model": "a/b", "loras": [{"lora": "c/d", "strength": "nan"}]}],
            }
        )


@pytest.mark.parametrize("layout", ["diffusers", "single_file"])
def test_checkpoint_plus_lora_bakes_it_at_strength_one(pipeline, layout, tmp_path):
    """mergekit's ``model: base+adapter`` with a diffusion LoRA file after the ``+``: the same
    as the model's LoRA list at strength 1, i.e. diffusers' fuse_lora at scale 1."""
    family, folder = pipeline["family"], pipeline["folder"]
    lora = pipeline["files"]["kohya"]
    checkpoint = folder if layout == "diffusers" else pipeline["single"]
    recipe = parse_recipe(
        {"merge_method": "passthrough", "models": [{"model": f"{checkpoint}+{lora}"}]}
    )
    merge(preflight(recipe), tmp_path / "plus")
    if layout == "diffusers":
        got = component_weights(tmp_path / "plus", family)
    else:
        got = load_file(next((tmp_path / "plus").glob("*.safetensors")))
    want = diffusers_fused(folder, family, [(lora, 1.0)])
    assert_same(got, want if layout == "diffusers" else as_single_file(want, family))


# --- several LoRAs merged into one LoRA file ---------------------------------------------------


def _merge_files(
    pipeline, out: Path, combination: str, rank: int | None = None, second: str = "second"
) -> Path:
    from merge_engine.recipe.schema import ModelReference
    from merge_engine.run.lora_merge import merge_lora_files
    from merge_engine.sources.inspection import inspect_model

    files = pipeline["files"]
    model = inspect_model(ModelReference(str(pipeline["folder"])))
    loras = [
        (inspect_model(ModelReference(str(files["kohya"]))), 0.8),
        (inspect_model(ModelReference(str(files[second]))), -0.6),
    ]
    return merge_lora_files(model, loras, out, combination, rank)


def test_lora_files_merged_by_concatenation_equal_both_fused(pipeline, tmp_path):
    """A recipe (``output: adapter``, PEFT's ``cat``, an SD base) merging two kohya LoRAs (for
    SDXL in LDM names): the kohya file written, loaded by diffusers, equals fusing both; its
    header holds the recipe."""
    from safetensors import safe_open

    family, folder, files = pipeline["family"], pipeline["folder"], pipeline["files"]
    recipe = parse_recipe(
        {
            "output": "adapter",
            "merge_method": "cat",
            "base_model": str(pipeline["single"]),
            "models": [
                {"model": str(files["kohya"]), "parameters": {"weight": 0.8}},
                {"model": str(files["second"]), "parameters": {"weight": -0.6}},
            ],
        }
    )
    plan = preflight(recipe)
    assert plan.summary()[0].startswith("ok: cat of 2 LoRA files of")
    merged = merge(plan, tmp_path / "merged") / "pytorch_lora_weights.safetensors"
    with safe_open(merged, "pt") as f:
        assert parse_recipe(yaml.safe_load(f.metadata()["mergebot_recipe"])) == recipe
        names = list(f.keys())
    prefix = "lora_unet_input_blocks_" if family == "sdxl" else "lora_unet_down_blocks_"
    assert any(n.startswith(prefix) for n in names)
    assert all(n.startswith(("lora_unet_", "lora_te")) for n in names)
    want = diffusers_fused(folder, family, [(files["kohya"], 0.8), (files["second"], -0.6)])
    got = diffusers_fused(folder, family, [(merged, 1.0)])
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)


def test_kohya_and_diffusers_files_merge_into_their_sum(pipeline, tmp_path):
    """A kohya file and a diffusers-format one (different modules, different ranks): the merged
    file baked at 1 equals both baked at their weights (mergebot's bake, checked against
    diffusers above)."""
    files = pipeline["files"]
    merged = _merge_files(pipeline, tmp_path / "merged", "cat", second="diffusers")
    got = bake(tmp_path / "one", pipeline["folder"], [{"lora": str(merged)}])
    want = bake(
        tmp_path / "two",
        pipeline["folder"],
        [
            {"lora": str(files["kohya"]), "strength": 0.8},
            {"lora": str(files["diffusers"]), "strength": -0.6},
        ],
    )
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
    assert any(
        k.startswith("text_encoder") and "q_proj" in k and not torch.equal(got[k], base)
        for k, base in component_weights(pipeline["folder"], pipeline["family"]).items()
    )


def test_lora_files_merged_by_svd_are_the_truncated_svd_of_the_sum(pipeline, tmp_path):
    """``svd`` at full rank (what each module can hold) reproduces the sum; at rank 2 each
    module's product is the rank-2 truncated SVD of the summed delta (clamped on smaller ones)."""
    from merge_engine.methods.low_rank import factor

    family, folder = pipeline["family"], pipeline["folder"]
    full = _merge_files(pipeline, tmp_path / "full", "svd", rank=10_000)
    both = _merge_files(pipeline, tmp_path / "cat", "cat")
    want = diffusers_fused(folder, family, [(both, 1.0)])
    got = diffusers_fused(folder, family, [(full, 1.0)])
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)
    low = load_file(_merge_files(pipeline, tmp_path / "low", "svd", rank=2))
    cat = load_file(both)
    modules = {k.removesuffix(".lora_down.weight") for k in cat if k.endswith(".lora_down.weight")}
    alphas = {low[k].item() for k in low if k.endswith(".alpha")} | {
        cat[k].item() for k in cat if k.endswith(".alpha")
    }
    assert len(alphas) == 2  # one alpha per file: diffusers mixes up alphas that differ

    def product(file: dict, name: str) -> torch.Tensor:
        down, up = file[f"{name}.lora_down.weight"], file[f"{name}.lora_up.weight"]
        scale = file[f"{name}.alpha"].item() / down.shape[0]
        return scale * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])

    for name in sorted(modules):
        summed = product(cat, name)
        expected = factor(summed, rank=min(2, *summed.flatten(1).shape)).product()
        torch.testing.assert_close(product(low, name), expected, rtol=1e-4, atol=1e-5)


# --- extraction ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(pipeline, tmp_path_factory) -> dict:
    from merge_engine.example_diffusion import make_finetune

    root = tmp_path_factory.mktemp(f"tuned-{pipeline['family']}")
    folder = make_finetune(pipeline["folder"], root / "tuned", seed=9, noise=0.05)
    single = write_single_file(folder, root / "tuned.safetensors", pipeline["family"])
    return {"diffusers": folder, "single_file": single}


def _extract(args: list[str]) -> int:
    from merge_engine.cli import main

    return main(["extract-lora", *args, "--quiet"])


def test_extracted_sd_lora_at_full_rank_loads_in_diffusers_and_reproduces_the_fine_tune(
    pipeline, tuned, tmp_path
):
    """``mergebot extract-lora`` on an SD fine-tune: a kohya file diffusers loads; fused at
    1 it gives the fine-tune's weights on every module the LoRA holds and leaves the rest."""
    family, folder = pipeline["family"], pipeline["folder"]
    from merge_engine.methods.low_rank import max_rank
    from merge_engine.sources.formats.kohya_lora import lora_places

    shapes = {k: tuple(v.shape) for k, v in component_weights(folder, family).items()}
    full = max(max_rank(p.shape) for p in lora_places(Layout(family, "diffusers"), shapes))
    out = tmp_path / "extracted"
    args = [str(tuned["diffusers"]), str(out), "--base", str(folder), "--rank", str(full)]
    assert _extract(args) == 0
    lora = out / "pytorch_lora_weights.safetensors"
    names = {k.rsplit(".", 2)[0] for k in load_file(lora)}
    got = diffusers_fused(folder, family, [(lora, 1.0)])
    finetune, base = (
        component_weights(tuned["diffusers"], family),
        component_weights(folder, family),
    )
    reproduced = 0
    for key, value in got.items():
        if torch.equal(value, base[key]):
            continue
        torch.testing.assert_close(value, finetune[key], rtol=1e-4, atol=1e-4)
        reproduced += 1
    assert reproduced == len(names)
    assert any(
        n.startswith("lora_unet_input_blocks" if family == "sdxl" else "lora_unet_down")
        for n in names
    )
    baked = bake(tmp_path, folder, [{"lora": str(lora)}])
    for key in (k for k in baked if not torch.equal(baked[k], base[k])):
        torch.testing.assert_close(baked[key], finetune[key], rtol=1e-4, atol=1e-4)


def test_extracted_sd_lora_at_rank_r_is_the_truncated_svd(pipeline, tuned, tmp_path):
    """A single-file fine-tune at rank 2, LoCon's convolutions included: each module's product
    is the rank-2 truncated SVD of fine-tune − base, and the reported error is the SVD's."""
    from merge_engine.extract.sd_lora import extract_sd_lora, plan_sd_extraction
    from merge_engine.methods.low_rank import factor
    from merge_engine.recipe.schema import ModelReference
    from merge_engine.sources.inspection import inspect_model

    finetune = inspect_model(ModelReference(str(tuned["single_file"])))
    base = inspect_model(ModelReference(str(pipeline["single"])))
    plan = plan_sd_extraction(finetune, base, rank=2, conv=True)
    result = extract_sd_lora(plan, tmp_path / "low")
    lora = load_file(result.out)
    tuned_weights, base_weights = load_file(tuned["single_file"]), load_file(pipeline["single"])
    assert any("resnets" in m.name or "in_layers" in m.name for m in result.modules)
    for place, module in zip(plan.places, result.modules, strict=True):
        start, end = place.rows or (0, None)
        delta = (
            tuned_weights[place.tensor][start:end] - base_weights[place.tensor][start:end]
        ).float()
        expected = factor(delta, rank=2)
        down, up = lora[f"{module.name}.lora_down.weight"], lora[f"{module.name}.lora_up.weight"]
        scale = lora[f"{module.name}.alpha"].item() / down.shape[0]
        product = scale * (up.flatten(1) @ down.flatten(1)).reshape(delta.shape)
        torch.testing.assert_close(product, expected.product(), rtol=1e-4, atol=1e-5)
        assert module.relative_error == pytest.approx(expected.relative_error, rel=1e-5)


def test_sd_extraction_bad_input_is_one_sentence(pipeline, tuned, sd1_and_sdxl, tmp_path, capsys):
    other = sd1_and_sdxl["sdxl" if pipeline["family"] == "sd1" else "sd1"]
    folder, base = str(tuned["diffusers"]), str(pipeline["folder"])
    cases = [
        ([folder, "--base", str(pipeline["single"]), "--rank", "4"], "same layout"),
        ([folder, "--base", str(other), "--rank", "4"], "same layout"),
        ([folder, "--base", base, "--rank", "0"], "at least 1"),
        ([folder, "--base", base, "--rank", "100000"], "larger than any weight"),
        ([folder, "--base", base, "--energy", "0.9"], "--rank R alone"),
    ]
    for args, words in cases:
        out = tmp_path / "out"
        assert _extract([args[0], str(out), *args[1:]]) == 1
        message = capsys.readouterr().err.strip()
        assert words in message and "\n" not in message, message
        assert not out.exists()


@pytest.mark.parametrize(
    ("method", "parameters", "words"),
    [
        ("ties", {"density": 0.5}, "merge_method: ties is not a way mergebot merges SD LoRA files"),
        ("svd", {"svd_clamp": 0.99}, "parameters.svd_clamp: clips the factors' values"),
        ("cat", {}, "is an SDXL LoRA"),
    ],
)
def test_sd_lora_file_merge_bad_input_is_one_sentence(
    sd1_and_sdxl, tmp_path, method, parameters, words
):
    lora = sd1_and_sdxl["sdxl_lora" if method == "cat" else "sd1_lora"]
    recipe = {
        "output": "adapter",
        "merge_method": method,
        "base_model": str(sd1_and_sdxl["sd1"]),
        "models": [{"model": str(lora)}, {"model": str(sd1_and_sdxl["sd1_lora"])}],
        "parameters": parameters,
    }
    out = tmp_path / "out"
    with pytest.raises((RecipeError, IncompatibleModelsError)) as error:
        merge(preflight(parse_recipe(recipe)), out)
    assert words in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert not out.exists()


@pytest.mark.slow  # starts mergebot in a subprocess against the sandbox hub
def test_hub_lora_is_read_by_header_pinned_downloaded_and_baked(sd1_and_sdxl, tmp_path):
    """A checkpoint and a LoRA on the (sandbox) Hub: the recipe and the card pin both, and
    the merge equals baking the same files locally."""
    from huggingface_hub import HfApi
    from test_sources_hub import TOKEN, mergebot

    from service.sandbox_hub import HubStore, SandboxHub, SandboxServer

    sandbox = SandboxHub(HubStore(), users={TOKEN: "alice"})
    with SandboxServer(sandbox) as server:
        api = HfApi(endpoint=server.url, token=TOKEN)
        api.create_repo("alice/sd1")
        api.upload_folder(repo_id="alice/sd1", folder_path=sd1_and_sdxl["sd1"])
        api.create_repo("alice/style")
        api.upload_file(
            repo_id="alice/style",
            path_or_fileobj=str(sd1_and_sdxl["sd1_lora"]),
            path_in_repo="style.safetensors",
        )
        shas = {name: api.model_info(f"alice/{name}").sha for name in ("sd1", "style")}
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(
            "merge_method: linear\nmodels:\n  - model: alice/sd1\n    parameters: {weight: 1}\n"
            "    loras: [{lora: alice/style, strength: 0.7}]\n"
        )
        run = mergebot(server, tmp_path, "merge", str(recipe), str(tmp_path / "out"), "--quiet")
        assert run.returncode == 0, run.stderr
    pinned = (tmp_path / "out" / "mergebot_recipe.yaml").read_text()
    card = (tmp_path / "out" / "README.md").read_text()
    for name, sha in shas.items():
        assert f"alice/{name}@{sha}" in pinned and f"`{sha}`" in card
    assert "| LoRA, strength 0.7 |" in card
    local = bake(
        tmp_path / "local",
        sd1_and_sdxl["sd1"],
        [{"lora": str(sd1_and_sdxl["sd1_lora"]), "strength": 0.7}],
    )
    assert_same(component_weights(tmp_path / "out", "sd1"), local)
