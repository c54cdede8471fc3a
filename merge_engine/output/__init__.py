"""Writing a merge: the streaming sharded safetensors writer (``shards``), merged tensors
renamed into another layout as they come (``conversion``), and the model card from its
template (``card``, ``templates/``). The output reads the plan; nothing below it (the plan,
the sources, the recipe) imports the output."""
