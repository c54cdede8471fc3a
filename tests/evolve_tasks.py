"""Two synthetic digit tasks and a tiny Llama family fine-tuned on them, for the evolve tests.

A helper module (not a test file). ``make_digit_family`` trains, in a few seconds on a CPU:

* ``base``: a tiny Llama pretrained briefly on a mix of both tasks (it learns the format and
  a little of each task),
* ``copy``: the base fine-tuned on ``"copy 4821="`` → ``"4821"`` rows only,
* ``reverse``: the base fine-tuned on ``"reverse 4821="`` → ``"1284"`` rows only,

each saved as safetensors with the tiny character tokenizer beside it. The task word in the
prompt is what lets one merged model do both. Loss is on the answer characters and the
end-of-sequence token only.

The digit strings are split for good by a hash (``split``): the family trains on ``"train"``
strings; a search scores on ``"dev"`` strings and a test checks on ``"test"`` strings, so the
three never share a string.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from merge_engine.example import TINY_ALPHABET, save_model, save_tiny_tokenizer, tiny_config

TASKS = ("copy", "reverse")
SYMBOLS = {"copy": "0123456789", "reverse": "0123456789"}
SPLITS = {"train": range(0, 6), "dev": range(6, 8), "test": range(8, 10)}
"""Which tenth of the digit strings (by CRC-32) each split draws from."""

PAD, EOS = 0, 2
_IDS = {char: i + 3 for i, char in enumerate(TINY_ALPHABET)}  # as save_tiny_tokenizer numbers them

DIGIT_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=32,
)

# training schedule: (steps, learning rate); batch size BATCH
BATCH = 64
PRETRAIN = (300, 3e-3)
FINETUNE = (100, 1e-3)


# --- data ---------------------------------------------------------------------------------


def _split_of(digits: str) -> str:
    tenth = zlib.crc32(digits.encode()) % 10
    return next(name for name, tenths in SPLITS.items() if tenth in tenths)


def digit_rows(
    task: str, count: int, seed: int, split: str = "train", lengths: tuple[int, int] = (3, 5)
) -> list[dict]:
    """``count`` rows ``{"prompt": "copy 4821=", "answer": "4821"}`` (or ``"reverse 4821="`` →
    ``"1284"``) of ``lengths`` (low, high) random digits, from ``split`` ("train", "dev" or
    "test")."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {tuple(SPLITS)}")
    rng = random.Random(f"{task}/{split}/{seed}")
    rows = []
    while len(rows) < count:
        digits = "".join(rng.choice(SYMBOLS[task]) for _ in range(rng.randint(*lengths)))
        if _split_of(digits) != split:
            continue
        answer = digits if task == "copy" else digits[::-1]
        rows.append({"prompt": f"{task} {digits}=", "answer": answer})
    return rows


def encode(text: str) -> list[int]:
    """The tiny tokenizer's ids for ``text``, without loading it (same numbering)."""
    return [_IDS[char] for char in text.lower()]


def _batch(rows: Sequence[Mapping[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels (-100 except on the answer and eos). Right padding
    needs no attention mask in a causal model: no real token sees a pad."""
    seqs = [(encode(r["prompt"]), encode(r["answer"]) + [EOS]) for r in rows]
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (prompt, answer) in enumerate(seqs):
        ids[i, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[i, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
    return ids, labels


# --- training ------------------------------------------------------------------------------


def _loss(model, ids: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction=reduction,
    )


def train(
    model, rows: Sequence[Mapping[str, str]], steps: int, lr: float, seed: int, decay: bool = True
):
    """AdamW (no weight decay) on batches of BATCH rows: a short warm-up, then a linear decay
    to zero (``decay``) or a constant rate."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return (steps - step) / (steps - warmup) if decay else 1.0

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    model.train()
    for _ in range(steps):
        ids, labels = _batch(rng.sample(rows, BATCH) if len(rows) > BATCH else rows)
        optimizer.zero_grad(set_to_none=True)
        _loss(model, ids, labels).backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return model


def new_model(seed: int = 0, **config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("llama", **{**DIGIT_LLAMA, **config}))


def train_digit_family(
    seed: int = 0,
    pretrain: tuple[int, float] = PRETRAIN,
    finetune: tuple[int, float] | Mapping[str, tuple[int, float]] = FINETUNE,
    base_lengths: tuple[int, int] = (3, 5),
    tune_lengths: tuple[int, int] = (3, 5),
    decay: tuple[bool, bool] = (True, True),
    **config,
) -> dict[str, torch.nn.Module]:
    """The three models in memory: {"base", "copy", "reverse"}."""
    pool = 4096
    mix = [row for task in TASKS for row in digit_rows(task, pool, seed, lengths=base_lengths)]
    base = train(new_model(seed, **config), mix, *pretrain, seed=seed * 1000 + 1, decay=decay[0])
    family = {"base": base}
    for i, task in enumerate(TASKS):
        steps, lr = finetune[task] if isinstance(finetune, Mapping) else finetune
        model = new_model(seed, **config)
        model.load_state_dict(base.state_dict())
        rows = digit_rows(task, pool, seed + 100, lengths=tune_lengths)
        family[task] = train(model, rows, steps, lr, seed=seed * 1000 + 2 + i, decay=decay[1])
    return family


def make_digit_family(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Train the family (see the module docstring) and save each model, with the tiny
    tokenizer, under ``folder``; returns {"base": …, "copy": …, "reverse": …} folders."""
    paths = {}
    for name, model in train_digit_family(seed).items():
        path = save_model(model, Path(folder) / name)
        save_tiny_tokenizer(path)
        paths[name] = path
    return paths


# --- evaluation ----------------------------------------------------------------------------


def load(state_or_path, seed: int = 0, **config):
    """A model of the family's shape from a folder or a state dict."""
    if isinstance(state_or_path, (str, Path)):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(state_or_path).eval()
    model = new_model(seed, **config)
    model.load_state_dict(state_or_path)
    return model.eval()


@torch.no_grad()
def answer_nll(model, rows: Sequence[Mapping[str, str]]) -> float:
    """Mean negative log-likelihood per answer token (the answer's characters and eos)."""
    ids, labels = _batch(rows)
    losses = _loss(model, ids, labels, reduction="sum")
    return losses.item() / (labels != -100).sum().item()


@torch.no_grad()
def exact_match(model, rows: Sequence[Mapping[str, str]], max_new_tokens: int = 7) -> float:
    """The fraction of rows whose greedy continuation, up to eos, is exactly the answer."""
    groups: dict[int, list[int]] = {}
    prompts = [encode(r["prompt"]) for r in rows]
    for i, prompt in enumerate(prompts):
        groups.setdefault(len(prompt), []).append(i)  # equal lengths decode as one batch
    hits = 0
    for members in groups.values():
        ids = torch.tensor([prompts[i] for i in members])
        done = torch.zeros(len(members), dtype=torch.bool)
        out = [[] for _ in members]
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1)
            for j, token in enumerate(nxt.tolist()):
                if not done[j]:
                    if token == EOS:
                        done[j] = True
                    else:
                        out[j].append(token)
            if done.all():
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        for j, i in enumerate(members):
            hits += bool(done[j]) and out[j] == encode(rows[i]["answer"])
    return hits / len(rows)
