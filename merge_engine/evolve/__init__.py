"""Evolutionary merging: search merge recipes (parameter space) and layer paths (data-flow
space) against a task metric, and write the winner as an ordinary recipe and model.

    spec.py        the search spec (YAML) and its schema
    checks.py      the spec against the registry, the models' headers and the task data
    fitness.py     the built-in evaluators (multiple choice, exact match, NLL, classification)
    lm_eval_tasks.py  lm-evaluation-harness task YAMLs, read safely, scored by lm-eval's evaluator
    lm_eval_model.py  the candidate as an lm-eval model (the optional extra, imported lazily)
    genome.py      a trial's numbers → a recipe (parameters) or a layer path (layers)
    candidates.py  evaluating a candidate in memory: one preallocated model, or a path
    study.py       the Optuna study (CMA-ES), its storage, the budget shared by workers
    report.py      trials.jsonl, the fitness plot, the path picture, the card's section
    search.py      the whole search: stages, the winner written with ``mergebot merge``
"""
