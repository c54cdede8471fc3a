"""Fitness from lm-evaluation-harness tasks (the optional extra ``mergebot[lm-eval]``).

A ``kind: lm_eval`` task names a task YAML as lm-eval writes them (``dataset_path``,
``doc_to_text``, ``output_type``, ``metric_list``, ...). mergebot reads the YAML itself with
the safe loader and refuses what would import code (``!function`` and any other custom tag,
``class``, ``include``, ``trust_remote_code``) before lm-eval is imported; lm-eval then builds
the task from that mapping, loads its data through ``datasets`` (a file named in
``dataset_kwargs.data_files`` is read beside the YAML) and scores the candidate in memory with
its own evaluator, through :class:`~merge_engine.evolve.lm_eval_model.CandidateLM`. lm-eval
loads no model and the search pays for lm-eval's import only when a spec has such a task.

Splits: a task with both ``validation_split`` and ``test_split`` is searched on the validation
documents and held out on the test documents; otherwise its evaluation documents are split
as a built-in task's data is (``held_out_fraction``, shuffled with seed 0).

The bot refuses these tasks: lm-eval renders its templates with Jinja outside a sandbox, so
a task YAML from a request could run code on the server.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from merge_engine.errors import RecipeError, excerpt
from merge_engine.evolve.spec import FitnessTask
from merge_engine.evolve.stopping import StopCheckFunction
from merge_engine.evolve.task_rows import Score, TaskRows, split_examples

INSTALL = "pip install 'mergebot[lm-eval]'"
BOT_REFUSAL = (
    "an lm_eval task runs its YAML's Jinja templates outside a sandbox, which this bot does "
    "not do for a request; describe the task with a built-in kind (exact_match, "
    "multiple_choice, nll or classification) over a Hub dataset or inline examples, or run "
    "it with mergebot evolve on your own machine"
)
FILE_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
"""``dataset_path`` values that read files named in ``dataset_kwargs.data_files``."""
REFUSED_KEYS = {
    "class": "names a Python class, which imports code",
    "include": "includes another file; write the task in one file",
    "group": "makes a group; name one task per file",
    "task_list": "lists several tasks; name one task per file",
}


@dataclass
class LmEvalRows(TaskRows):
    """An lm-eval task read and checked: ``search`` and ``held_out`` hold the indices of the
    evaluation documents of ``search_task`` and ``held_out_task`` (lm-eval ``Task`` objects)
    that each split scores, ``result`` is the key of the metric in lm-eval's results."""

    search_task: Any
    held_out_task: Any
    metric: str
    result: str
    higher_is_better: bool


# Reading


def check_task_files(tasks: list[FitnessTask], hub_only: bool = False) -> None:
    """Every lm-eval task's YAML read and checked, before any model or data is: one sentence
    for a missing file, a tag or key that imports code, or a bot request (``hub_only``)."""
    for i, task in enumerate(tasks):
        if task.kind == "lm_eval":
            read_config(task, f"fitness[{i}]", hub_only)


def read_config(task: FitnessTask, where: str, hub_only: bool = False) -> dict[str, Any]:
    """The task YAML as a mapping, data files resolved beside it; refused as described above."""
    if hub_only:
        raise RecipeError(BOT_REFUSAL, field=f"{where}.kind")
    field = f"{where}.task"
    path = Path(task.task).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(
            f"lm-eval task {excerpt(task.task, 200)} is not UTF-8 text; save it as UTF-8",
            field=field,
        ) from None
    except OSError:
        raise RecipeError(
            f"lm-eval task file {excerpt(task.task, 200)} does not exist or cannot be read; check the path in {field}",
            field=field,
        ) from None
    try:
        tag = _custom_tag(yaml.compose(text, Loader=yaml.SafeLoader))
        if tag is not None:
            raise RecipeError(
                f"lm-eval task {excerpt(task.task, 200)} uses the tag {excerpt(tag.tag)} at line {tag.start_mark.line + 1}, "
                "which imports Python code; mergebot runs lm-eval tasks from their data and templates only, "
                "so write that step as a Jinja template or a filter, or prepare the data beforehand",
                field=field,
            )
        config = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(
            f"lm-eval task {excerpt(task.task, 200)} is not valid YAML{at}; fix the file",
            field=field,
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise RecipeError(
            f"lm-eval task {excerpt(task.task, 200)} is not a task mapping with a 'task' name; write one lm-eval task per file",
            field=field,
        )
    for key, why in REFUSED_KEYS.items():
        if key in config:
            raise RecipeError(
                f"lm-eval task {excerpt(task.task, 200)} has '{key}', which {why}; remove it",
                field=field,
            )
    kwargs = config.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict) or kwargs.get("trust_remote_code"):
        raise RecipeError(
            f"lm-eval task {excerpt(task.task, 200)} asks for trust_remote_code or has dataset_kwargs that are not a mapping; "
            "mergebot runs no dataset code, so give the data as files (dataset_path: json) or a Hub dataset without a script",
            field=field,
        )
    if config.get("dataset_path") in FILE_BUILDERS and "data_files" in kwargs:
        kwargs["data_files"] = _beside(kwargs["data_files"], path.parent)
    return config


def _custom_tag(root: yaml.Node) -> yaml.Node | None:
    """The first node with a tag YAML's safe schema does not define (``!function``, ``!!python``
    ...), walked without recursion."""
    stack = [root]
    while stack:
        node = stack.pop()
        if not node.tag.startswith("tag:yaml.org,2002:") or "python" in node.tag:
            return node
        if isinstance(node, yaml.SequenceNode):
            stack += reversed(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack += [part for pair in reversed(node.value) for part in reversed(pair)]
    return None


def _beside(files: Any, folder: Path) -> Any:
    """``data_files`` (a name, a list, or a mapping of split to either) with relative names
    read from ``folder``, the YAML's; URLs and absolute paths unchanged."""
    if isinstance(files, str):
        return files if "://" in files else str(folder / Path(files).expanduser())
    if isinstance(files, list):
        return [_beside(name, folder) for name in files]
    if isinstance(files, dict):
        return {split: _beside(names, folder) for split, names in files.items()}
    return files


def read_task(task: FitnessTask, where: str, hub_only: bool = False) -> LmEvalRows:
    """The task built by lm-eval from its checked YAML, its data loaded, its metric chosen
    (``metric``, else the task's first) and its documents split."""
    config = read_config(task, where, hub_only)
    field = f"{where}.task"
    if config.get("validation_split") and config.get("test_split"):
        search_task = _build({**config, "test_split": None}, task, field)
        held_out_task = _build(config, task, field)
        search = list(range(len(search_task.eval_docs)))
        held_out = list(range(len(held_out_task.eval_docs)))
    else:
        search_task = held_out_task = _build(config, task, field)
        documents = list(range(len(search_task.eval_docs)))
        if len(documents) < 2:
            raise RecipeError(
                f"lm-eval task {excerpt(task.task, 200)} has {len(documents)} document, too few to keep some for the held-out score; "
                "add documents or give the YAML both a validation_split and a test_split",
                field=field,
            )
        search, held_out = split_examples(documents, task.held_out_fraction, 0, where)
    metrics = list(search_task.aggregation())
    metric = task.metric or metrics[0]
    if metric not in metrics:
        raise RecipeError(
            f"lm-eval task {excerpt(task.task, 200)} has no metric {metric!r} (it has {', '.join(metrics)}); set metric to one of them",
            field=f"{where}.metric",
        )
    first_filter = (
        search_task.config.filter_list[0]["name"] if search_task.config.filter_list else "none"
    )
    return LmEvalRows(
        task=task,
        name=task.name or task.kind,
        where=where,
        search=search,
        held_out=held_out,
        search_task=search_task,
        held_out_task=held_out_task,
        metric=metric,
        result=f"{metric},{first_filter}",
        higher_is_better=bool(search_task.higher_is_better().get(metric, True)),
    )


def _build(config: dict[str, Any], task: FitnessTask, field: str) -> Any:
    ConfigurableTask = _lm_eval().api.task.ConfigurableTask
    try:
        return ConfigurableTask(config=copy.deepcopy(config))
    except Exception as error:  # lm-eval's and datasets' own, of many kinds
        raise RecipeError(
            f"lm-eval could not build the task in {excerpt(task.task, 200)} ({type(error).__name__}: {excerpt(str(error), 200)}); fix the task YAML or its data",
            field=field,
        ) from None


def _lm_eval() -> Any:
    """lm-eval, imported on first use: it takes seconds, and is an optional extra."""
    try:
        import lm_eval.api.task
        import lm_eval.evaluator
    except ImportError:
        raise RecipeError(
            f"an lm_eval fitness task needs the lm-eval extra; install it with {INSTALL}",
            field="fitness",
        ) from None
    return lm_eval


# Evaluating


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: LmEvalRows,
    split: str,
    device: torch.device,
    check: StopCheckFunction,
) -> Score:
    """The task's metric on ``split``, from lm-eval's evaluator over the candidate in memory
    (no stderr bootstrap, no samples logged); a lower-is-better metric's fitness is its
    negative, as nll's is."""
    from merge_engine.evolve.lm_eval_model import CandidateLM

    lm_task = rows.search_task if split == "search" else rows.held_out_task
    documents = rows.search if split == "search" else rows.held_out
    candidate = CandidateLM(model, tokenizer, rows.task, device, check)
    with _quiet():
        results = _lm_eval().evaluator.evaluate(
            candidate,
            {rows.name: lm_task},
            samples={rows.name: documents},
            bootstrap_iters=0,
            log_samples=False,
        )
    value = float(results["results"][rows.name][rows.result])
    return Score(rows.name, rows.metric, value, value if rows.higher_is_better else -value)


@contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's evaluator logs every request type at INFO: a search runs it every trial."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


__all__ = ["BOT_REFUSAL", "LmEvalRows", "check_task_files", "evaluate_task", "read_task"]
