"""The task-arithmetic family's per-entry arithmetic gives the same bits eager (in blocks) and
compiled into one loop (``torch.compile``, what a search's candidates of a large model run);
where this machine cannot compile, merges go on eagerly with the same results, and say so."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from merge_engine.methods import get_method
from merge_engine.methods.task_vector_sum import BLOCK, compiled_entries

SIZE = BLOCK + 12_345  # eager mode crosses a block boundary


def inputs(dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(SIZE, generator=g)
    tuned = [base + 0.01 * torch.randn(SIZE, generator=g) for _ in range(3)]
    return [t.to(dtype) for t in tuned], base.to(dtype)


def merged(method: str, dtype: torch.dtype, **options) -> torch.Tensor:
    tuned, base = inputs(dtype)
    spec = get_method(method)
    extra = {"generator": torch.Generator().manual_seed(5)} if spec.random else {}
    return spec.kernel(
        tuned,
        base,
        weight=[0.3, -0.55, 1.0],
        density=[0.3, 1.0, 0.55],  # one model keeps everything
        normalize=True,
        rescale=spec.random,
        lambda_=0.7,
        int8_mask=False,
        **extra,
        **options,
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "dare_ties"])
def test_compiled_kernels_give_the_eager_bits(method, dtype):
    eager = merged(method, dtype)
    compiled = merged(method, dtype, compiled=True)
    assert not compiled_entries().failed, "torch.compile fell back to eager on this machine"
    assert compiled.dtype == eager.dtype and torch.equal(compiled, eager)


NO_COMPILER = """
import torch, torch._inductor.config
from test_task_vector_sum import merged
torch._inductor.config.cpp.cxx = ("/nonexistent/g++",)
first = merged("ties", torch.float32, compiled=True)
second = merged("ties", torch.float32, compiled=True)
eager = merged("ties", torch.float32)
print("equal" if torch.equal(first, eager) and torch.equal(second, eager) else "differ")
"""


@pytest.mark.slow
def test_without_a_compiler_a_compiled_merge_runs_eagerly_and_says_so_once():
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")])
        ),
    }
    run = subprocess.run(
        [sys.executable, "-c", NO_COMPILER],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "equal"
    assert run.stderr.count("torch.compile does not work here (InvalidCxxCompiler") == 1
