"""Tiny real transformers models for the demo and the tests: a base and fine-tuned copies.

A "fine-tune" here is the base plus a small random task vector, saved with
``save_pretrained`` as safetensors, exactly like a real checkpoint on disk.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_LLAMA = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
TINY_GPT2 = dict(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=64)


def tiny_config(arch: str = "llama", **overrides):
    from transformers import GPT2Config, LlamaConfig

    if arch == "llama":
        return LlamaConfig(**{**TINY_LLAMA, **overrides})
    if arch == "gpt2":
        return GPT2Config(**{**TINY_GPT2, **overrides})
    raise ValueError(f"unknown tiny architecture {arch!r}; use llama or gpt2")


def save_model(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


TINY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;!?'\"()[]{}<>+-*/=_#%&|"


def save_tiny_tokenizer(folder: Path) -> Path:
    """A character-level tokenizer over :data:`TINY_ALPHABET` (ids below 72, so it fits the
    tiny models' 96-token vocabulary), saved as ``tokenizer.json`` with its config; decoding
    joins the characters back without spaces."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + list(TINY_ALPHABET))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # "1284", not "1 2 8 4": generated text compares as written
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    )
    fast.save_pretrained(folder)
    return folder


def make_family(
    folder: Path,
    arch: str = "llama",
    finetunes: int = 2,
    seed: int = 0,
    scale: float = 0.02,
    **config,
) -> tuple[Path, list[Path]]:
    """Save a random base model and ``finetunes`` perturbed copies under ``folder``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(tiny_config(arch, **config))
    base_dir = save_model(base, Path(folder) / "base")
    tuned_dirs = []
    for i in range(finetunes):
        generator = torch.Generator().manual_seed(seed * 1000 + i + 1)
        tuned = AutoModelForCausalLM.from_config(tiny_config(arch, **config))
        tuned.load_state_dict(base.state_dict())
        with torch.no_grad():
            for param in tuned.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * scale)
        tuned_dirs.append(save_model(tuned, Path(folder) / f"finetune-{i + 1}"))
    return base_dir, tuned_dirs


EXAMPLE_RECIPE = """\
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.7, density: [0.3, 0.7]}}
parameters:
  normalize: true
dtype: float32
"""

EXAMPLE_TEXTS = (
    "the cat sat on the mat.",
    "one, two, three, four.",
    "a merge of two models.",
    "abc def ghi jkl mno.",
    "hello world!",
    "2 + 2 = 4",
    "(x * y) / z",
    "the end.",
)

EXAMPLE_SEARCH = """\
# A tiny search (4 trials, seconds on a CPU) for the TIES weights and densities of the two
# fine-tunes that best predict the text below. Run it with: mergebot evolve {spec} {out}
space: parameters
models:
  - model: {a}
  - model: {b}
base_model: {base}
parameters:
  method: ties
  search: {{weight: [0, 1], density: [0.1, 1]}}
fitness:
  - name: text
    kind: nll
    data: {{examples: {examples}}}
budget: {{trials: 4, population: 4}}
seed: 0
"""
