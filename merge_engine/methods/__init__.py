"""Merge methods. Importing this package registers every method; look them up with
:func:`get_method` and list them with :func:`all_methods`."""

from merge_engine.methods import (  # noqa: F401  (imported to register)
    arcee_fusion,
    linear,
    model_stock,
    nearswap,
    passthrough,
    ram,
    sce,
    spherical,
    task_arithmetic,
    with_data,
)
from merge_engine.methods.registry import (
    REQUIRED,
    MergeMethod,
    Param,
    all_methods,
    get_method,
    kernel_argument,
)

__all__ = ["REQUIRED", "MergeMethod", "Param", "all_methods", "get_method", "kernel_argument"]
