"""Shared fixtures: tiny real transformers models saved as safetensors, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_engine.example import make_family


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny Llama base (4 layers, untied head) and three fine-tuned copies."""
    return make_family(tmp_path_factory.mktemp("llama"), "llama", finetunes=3)


@pytest.fixture(scope="session")
def scored_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny Llama base and two fine-tunes with the tiny tokenizer, as a search scores them.
    Weights of a trained model's size: with the default 0.02 the residual stream of a random
    model is so small that RMSNorm's eps, not the model, sets the last digits of the logits."""
    from merge_engine.example import save_tiny_tokenizer

    base, tuned = make_family(tmp_path_factory.mktemp("scored"), scale=0.05, initializer_range=0.2)
    for folder in (base, *tuned):
        save_tiny_tokenizer(folder)
    return base, tuned


SEARCH_TEXTS = [
    "abc def ghi",
    "the cat sat",
    "hello world",
    "one two three",
    "a b c d e",
    "xyz 123",
]
"""Short texts a search's ``nll`` task scores."""


@pytest.fixture(scope="session")
def gpt2_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny GPT-2 base (3 layers, head tied to the input embedding) and two fine-tunes."""
    return make_family(tmp_path_factory.mktemp("gpt2"), "gpt2", finetunes=2, seed=1)


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model, from a single file or from shards."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def write_recipe(folder: Path, text: str) -> Path:
    path = Path(folder) / "recipe.yaml"
    path.write_text(text)
    return path


TIES_WEIGHTS = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}]


def two_model_ties(base: Path, a: Path, b: Path) -> dict[str, torch.Tensor]:
    """The in-memory TIES merge that the file-based tests compare their outputs with."""
    from merge_engine import merge_models

    return merge_models([a, b], "ties", base=base, model_parameters=TIES_WEIGHTS)


@pytest.fixture
def one_thread():
    """Small matrices gain nothing from a second thread, and two threads slow down tenfold
    when another process holds the other core (the spinning threads wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
