"""What a pre-flight gives, by what the recipe's output is: a model (:class:`MergePlan`), a
PEFT adapter combined from adapters (:class:`AdapterPlan`), or Stable Diffusion LoRA files
merged into one (:class:`LoraFilePlan`). All three answer what the bot asks of a plan before
it runs: ``sources``, ``revisions()``, ``pinned_recipe()``, ``random``, ``output_bytes`` and
``describe_models()``."""

from __future__ import annotations

from merge_engine.plan.adapter_plan import AdapterPlan
from merge_engine.plan.lora_file_plan import LoraFilePlan
from merge_engine.plan.merge_plan import MergePlan

Plan = MergePlan | AdapterPlan | LoraFilePlan


def output_parts(plan: Plan) -> str:
    """How much the output holds, as the bot's Validate line says it: tensors or modules."""
    if isinstance(plan, MergePlan):
        return f"{len(plan.tasks)} tensors"
    count = len(plan.tasks) if isinstance(plan, AdapterPlan) else len(plan.modules)
    return f"{count} modules"
