"""What an extraction reports: each module's rank and error, and what differs outside the adapter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModuleResult:
    name: str
    rank: int
    relative_error: float
    """‖delta − B·A‖_F / ‖delta‖_F of the SVD (before the factors are cast to the adapter's dtype)."""


@dataclass
class ExtractionResult:
    out: Path
    modules: list[ModuleResult]
    differing: list[tuple[str, float]]
    """Tensors left out of the adapter that differ between fine-tune and base, with
    ‖fine-tune − base‖_F / ‖base‖_F, largest first."""
