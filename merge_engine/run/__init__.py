"""Executing a plan: the executor streams each task's tensors through its kernel on CPU or
CUDA into the writer (``executor``), after the passes that need the whole models first (the
statistics of ``statistics``, the align step of :mod:`merge_engine.align.step`); the same plan
and kernels on ``nn.Module``s in memory (``memory``), and RegMean and Fisher merges of models
in memory (``data_merge``)."""
