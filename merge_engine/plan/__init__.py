"""Planning, the pre-flight: recipe and sources' metadata become one task per output tensor
with every parameter resolved (``planner``), and every recipe or compatibility error is raised
before a weight is read. ``merge_plan`` holds what a plan is (the tasks, the plan itself), the
types the executor and the writers read; ``resolve`` checks one output tensor's inputs and
resolves its parameters; ``places`` says where each tensor sits for gradients, ``slices``
stacks layer ranges in order, ``output_config`` makes the config.json written and ``writes``
what the output holds besides the merged tensors (a baked VAE, ``discard``, another layout's
names)."""
