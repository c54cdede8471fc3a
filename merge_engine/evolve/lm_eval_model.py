"""The candidate in memory as an lm-eval model: imported only when a spec has an lm_eval task
(it imports lm-eval, an optional extra).

Text is tokenized as the built-in tasks tokenize a prompt (with the tokenizer's special
tokens, the last ``max_length`` tokens kept) and generation is the built-in greedy decoding,
so an lm-eval ``generate_until`` task scores what the built-in ``exact_match`` scores on the
same rows. Decoding is always greedy, whatever the task's ``generation_kwargs`` say beside
``until`` and ``max_gen_toks``.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import LM

from merge_engine.errors import RecipeError
from merge_engine.evolve.decoding import (
    ContinuationScore,
    batch_size_of,
    choice_scores,
    greedy,
    pad_id,
)
from merge_engine.evolve.spec import FitnessTask
from merge_engine.evolve.stopping import StopCheckFunction

DEFAULT_MAX_GEN_TOKS = 256
"""lm-eval's own default for a task whose ``generation_kwargs`` set no ``max_gen_toks``."""


class CandidateLM(LM):
    """``model`` (called as ``model(input_ids=..., attention_mask=...)`` → ``.logits``) and
    the search's ``tokenizer``; batches of the task's ``batch_size``, ``check()`` before every
    forward."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        task: FitnessTask,
        device: torch.device,
        check: StopCheckFunction,
    ):
        super().__init__()
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self._device, self.check = device, check  # lm-eval's LM reads _device
        self.pad = pad_id(tokenizer)

    # lm-eval's request types

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut before the first of the request's ``until`` strings;
        requests with the same ``max_gen_toks`` run together."""
        groups: dict[int, list[int]] = {}
        for index, request in enumerate(requests):
            limit = request.args[1].get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
            groups.setdefault(int(limit), []).append(index)
        texts = [""] * len(requests)
        for limit, members in groups.items():
            prompts = [self._prompt(requests[i].args[0]) for i in members]
            length = max(map(len, prompts)) + limit
            batch_size = batch_size_of(self.task, self.model, self.device, length, 1)
            eos = self.tokenizer.eos_token_id
            new = greedy(self.model, prompts, limit, eos, batch_size, self.device, self.check)
            for i, tokens in zip(members, new, strict=True):
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                texts[i] = _cut(text, requests[i].args[1].get("until"))
        return texts

    def loglikelihood(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[ContinuationScore]:
        """(summed log-probability of the continuation after the context, whether greedy
        decoding would give it), per request; a context's trailing space moves to the
        continuation, as lm-eval's own models do."""
        pairs = []
        for request in requests:
            context, continuation = request.args
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            pairs.append(self._pair(context, continuation))
        return self._score(pairs)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood after the tokenizer's first special token; a text
        longer than the task's ``max_length`` is refused rather than cut into windows."""
        pairs = [self._pair("", request.args[0]) for request in requests]
        for context, continuation in pairs:
            if len(context) + len(continuation) > self.task.max_length:
                raise RecipeError(
                    f"a text of this lm-eval task has {len(continuation):,} tokens, more than max_length "
                    f"({self.task.max_length:,}); raise max_length or shorten the texts",
                    field="fitness",
                )
        return [total for total, _ in self._score(pairs)]

    # Tokens and scores

    def _prompt(self, context: str) -> list[int]:
        ids = self.tokenizer(context, add_special_tokens=True)["input_ids"]
        return ids[-self.task.max_length :] or [self._first_token()]

    def _first_token(self) -> int:
        """What an empty context reads: the tokenizer's bos, else its eos."""
        for token in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if token is not None:
                return token
        return self.pad

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids): the whole text is tokenized once and split where
        the context's own tokens end, so a word is never cut into other tokens at the seam."""
        if not context:
            ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            return [self._first_token()], ids
        whole = self.tokenizer(context + continuation, add_special_tokens=True)["input_ids"]
        head = len(self.tokenizer(context, add_special_tokens=True)["input_ids"])
        return whole[:head], whole[head:]

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[ContinuationScore]:
        """Per (context, continuation), the continuation's summed log-probability and whether
        it is the greedy choice at every step (:func:`choice_scores`: contexts shared by
        several continuations run once); too long a pair loses the start of its context."""
        fitted = []
        for context, continuation in pairs:
            continuation = continuation[: self.task.max_length - 1]
            fitted.append((context[-(self.task.max_length - len(continuation)) :], continuation))
        longest = max(len(context) + len(continuation) for context, continuation in fitted)
        scored = max(len(continuation) for _, continuation in fitted)
        batch_size = batch_size_of(self.task, self.model, self.device, longest, scored)
        return choice_scores(self.model, fitted, self.pad, batch_size, self.device, self.check)


def _cut(text: str, until: Any) -> str:
    """``text`` up to the first of the ``until`` strings (one string or a list)."""
    stops = [until] if isinstance(until, str) else list(until or [])
    ends = [text.find(stop) for stop in stops if stop and stop in text]
    return text[: min(ends)] if ends else text
