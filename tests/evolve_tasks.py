"""Two synthetic digit tasks and a tiny Llama family fine-tuned on them, for the evolve tests.

A helper module (not a test file). ``make_digit_family`` trains, in about 20 s on one CPU
thread (500 steps of batch 64), bit for bit the same models whatever torch's thread setting:

* ``base``: a tiny Llama pretrained on a mix of both tasks until it does both fairly well,
* ``copy``: the base fine-tuned on ``"copy 4821="`` → ``"4821"`` rows only,
* ``reverse``: the base fine-tuned on ``"reverse 4821="`` → ``"1284"`` rows only,

each saved as safetensors with the tiny character tokenizer beside it. Loss is on the
answer's characters and the end-of-sequence token only. The task word in the prompt is what
lets one model do both; each fine-tune, seeing one task word only, learns its task near
perfectly and forgets the other (it answers the other task's prompts its own way). Their
task vectors are therefore large and pull against each other: the uniform TIES merge
(weight 1, density 0.5) keeps much of both pulls and does poorly, and a merge that takes a
small, tuned share of each vector does both tasks about as well as the base or better.

The digit strings are split for good by a hash (``split``): the family trains on ``"train"``
strings, a search scores on ``"dev"`` strings and a test checks on ``"test"`` strings, so no
two splits share a string.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from merge_engine.example import TINY_ALPHABET, save_model, save_tiny_tokenizer, tiny_config

TASKS = ("copy", "reverse")
SPLITS = {"train": range(0, 6), "dev": range(6, 8), "test": range(8, 10)}
"""Which tenths of the digit strings (by CRC-32) each split draws from."""

PAD, EOS = 0, 2
_IDS = {char: i + 3 for i, char in enumerate(TINY_ALPHABET)}  # as save_tiny_tokenizer numbers them
_CHARS = {i: char for char, i in _IDS.items()}

DIGIT_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=32,
)
"""The tiny Llama's shape (the rest as :data:`merge_engine.example.TINY_LLAMA`)."""

BATCH = 64
PRETRAIN = (300, 1e-3)
"""(steps, peak learning rate) of the base, on both tasks."""
FINETUNE = {"copy": (100, 1e-3), "reverse": (100, 2e-3)}
"""(steps, peak learning rate) of each fine-tune, on its own task only."""
POOL = 4096
"""Training rows drawn per task."""


# --- data ----------------------------------------------------------------------------------


def _split_of(digits: str) -> str:
    tenth = zlib.crc32(digits.encode()) % 10
    return next(name for name, tenths in SPLITS.items() if tenth in tenths)


def digit_rows(
    task: str, count: int, seed: int, split: str = "train", lengths: tuple[int, int] = (3, 5)
) -> list[dict[str, str]]:
    """``count`` rows ``{"prompt": "copy 4821=", "answer": "4821"}`` (or ``"reverse 4821="``
    → ``"1284"``) of ``lengths`` = (fewest, most) random digits, drawn with ``seed`` from the
    strings of ``split``: "train" (the family trains on these), "dev" or "test"."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {tuple(SPLITS)}")
    rng = random.Random(f"{task}/{split}/{seed}")
    rows = []
    while len(rows) < count:
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(*lengths)))
        if _split_of(digits) == split:
            answer = digits if task == "copy" else digits[::-1]
            rows.append({"prompt": f"{task} {digits}=", "answer": answer})
    return rows


def write_jsonl(path: Path, rows: Sequence[Mapping[str, str]]) -> Path:
    """Rows as a JSON-lines file, as a search spec's ``data: {path: ...}`` reads them."""
    Path(path).write_text("".join(json.dumps(dict(row)) + "\n" for row in rows))
    return Path(path)


def encode(text: str) -> list[int]:
    """The tiny tokenizer's ids for ``text`` (no special tokens), without loading it."""
    return [_IDS[char] for char in text.lower()]


def _batch(rows: Sequence[Mapping[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids of prompt + answer + eos, and labels that are -100 except on the
    answer and eos. Right padding needs no attention mask: in a causal model no real token
    sees the padding after it."""
    pairs = [(encode(r["prompt"]), encode(r["answer"]) + [EOS]) for r in rows]
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (prompt, answer) in enumerate(pairs):
        ids[i, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[i, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
    return ids, labels


# --- the models ----------------------------------------------------------------------------


def _loss(model, ids: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction=reduction,
    )


def train(model, rows: Sequence[Mapping[str, str]], steps: int, lr: float, seed: int):
    """AdamW without weight decay on batches of BATCH rows drawn with ``seed``: a warm-up over
    the first tenth of the steps, then a linear decay to zero."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (step + 1) / warmup if step < warmup else (steps - step) / (steps - warmup),
    )
    model.train()
    for _ in range(steps):
        ids, labels = _batch(rng.sample(list(rows), BATCH))
        optimizer.zero_grad(set_to_none=True)
        _loss(model, ids, labels).backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def new_model(seed: int = 0):
    """A freshly initialised tiny Llama of the family's shape (:data:`DIGIT_LLAMA`)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("llama", **DIGIT_LLAMA))


def train_digit_family(
    seed: int = 0,
    pretrain: tuple[int, float] = PRETRAIN,
    finetune: Mapping[str, tuple[int, float]] = FINETUNE,
) -> dict[str, torch.nn.Module]:
    """The three models in memory: {"base": ..., "copy": ..., "reverse": ...}."""
    mix = [row for task in TASKS for row in digit_rows(task, POOL, seed)]
    family = {"base": train(new_model(seed), mix, *pretrain, seed=seed * 1000 + 1)}
    for i, task in enumerate(TASKS):
        model = new_model(seed)
        model.load_state_dict(family["base"].state_dict())
        rows = digit_rows(task, POOL, seed + 100)
        family[task] = train(model, rows, *finetune[task], seed=seed * 1000 + 2 + i)
    return family


def make_digit_family(folder: Path, seed: int = 0, threads: int | None = 1) -> dict[str, Path]:
    """Train the family (see the module docstring) and save each model as safetensors, with
    the tokenizer, under ``folder``; returns the folders {"base", "copy", "reverse"}.

    Trains on ``threads`` threads (None: torch's setting as it is), restoring the setting
    after: these matrices gain little from a second thread, and two threads slow down
    several-fold when another process holds the other core. The weights do not depend on it."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        family = train_digit_family(seed)
    finally:
        torch.set_num_threads(previous)
    return {
        name: save_tiny_tokenizer(save_model(model, Path(folder) / name))
        for name, model in family.items()
    }


def load_digit_model(state_or_folder: Mapping[str, torch.Tensor] | Path | str):
    """A model of the family's shape, from a saved folder or a (merged) state dict."""
    if isinstance(state_or_folder, (str, Path)):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(state_or_folder).eval()
    model = new_model()
    model.load_state_dict(state_or_folder)
    return model.eval()


# --- evaluation ----------------------------------------------------------------------------


@torch.no_grad()
def answer_nll(model, rows: Sequence[Mapping[str, str]]) -> float:
    """Mean negative log-likelihood (nats) per answer token: the answer's characters and eos,
    given the prompt. Lower is better."""
    ids, labels = _batch(rows)
    return _loss(model, ids, labels, reduction="sum").item() / (labels != -100).sum().item()


@torch.no_grad()
def exact_match(model, rows: Sequence[Mapping[str, str]], max_new_tokens: int = 8) -> float:
    """Share of rows whose greedy continuation, up to eos, stripped, is the answer."""
    prompts = [encode(row["prompt"]) for row in rows]
    groups: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(len(prompt), []).append(i)  # equal lengths: one batch, no padding
    hits = 0
    for members in groups.values():
        ids = torch.tensor([prompts[i] for i in members])
        new = torch.empty(len(members), 0, dtype=torch.long)
        for _ in range(max_new_tokens):
            token = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids, new = torch.cat([ids, token], 1), torch.cat([new, token], 1)
            if (new == EOS).any(1).all():
                break
        for i, out in zip(members, new.tolist(), strict=True):
            out = out[: out.index(EOS)] if EOS in out else out
            text = "".join(_CHARS.get(t, "") for t in out)  # special tokens decode to nothing
            hits += text.strip() == rows[i]["answer"].strip()
    return hits / len(rows)
