"""Extracting a LoRA adapter from a fine-tune and its base (``mergebot extract-lora``):
``plan`` checks the pair and decides each tensor's part from headers alone, ``run`` streams
the weights through the truncated SVD into a PEFT adapter folder, ``card`` describes it and ``result`` is what it reports.
See docs/lora.md."""

from merge_engine.extract.plan import ExtractedModule, ExtractionPlan, plan_extraction
from merge_engine.extract.result import ExtractionResult, ModuleResult
from merge_engine.extract.run import extract_lora

__all__ = [
    "ExtractedModule",
    "ExtractionPlan",
    "ExtractionResult",
    "ModuleResult",
    "extract_lora",
    "plan_extraction",
]
