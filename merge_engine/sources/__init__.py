"""Inspecting the sources, the second stage: a model reference (folder, ``.safetensors`` file,
``org/name@rev``) becomes its config, layout and tensors' names, shapes and dtypes, read from
configs and safetensors headers only (``inspection``, ``tensors``); ``formats/`` says how a
checkpoint names and groups its tensors, ``layers`` which layer a tensor belongs to, and
``hub_failures`` what a failed Hub read means. What a checkpoint holds never depends on what a
merge writes: nothing here imports the plan, the executor or the output."""
