"""One transformers model built at a time in a process.

transformers builds a model under ``torch.set_default_dtype(<the model's dtype>)`` and puts
the previous default back afterwards. The default is one for the whole process, so two
threads building models at once (the bot verifies a merge while a search loads its sources)
put each other's defaults back out of order, and the process is left making bfloat16 tensors
where float32 was meant ("expected m1 and m2 to have the same dtype"). Every
``from_pretrained`` and ``from_config`` of the engine and the bot runs inside
:func:`building_model`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_BUILDING = threading.RLock()


@contextmanager
def building_model() -> Iterator[None]:
    """Hold the process's one right to build a model (re-entrant within a thread)."""
    with _BUILDING:
        yield
