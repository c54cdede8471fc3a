"""Run ``mergekit-evolve`` (mergekit 0.1.5) on a machine without a GPU, for
``bench_vs_mergekit_evolve.py``. This file runs in the mergekit benchmark venv (never in
mergebot's environment; mergekit is not a dependency of mergebot):

    OMP_NUM_THREADS=1 /work/venvs/mergekit/bin/python benchmarks/mergekit_evolve_cpu.py \\
        CONFIG.yaml --storage-path DIR --max-fevals 60 --random-seed 0 [other mergekit-evolve options]

Every option is mergekit-evolve's own; this runner adds ``--no-in-memory --strategy pool
--num-gpus 1 --no-merge-cuda --batch-size 1 --no-reshard`` unless they are given: each
candidate is merged to disk by ``run_merge`` on the CPU and scored by lm-eval's ``hf`` model
loaded from that folder (mergekit's "maximum compatibility" path), one at a time. The
in-memory evaluator (``--in-memory``) fails in mergekit 0.1.5 whatever the device
(``MergePlanner.plan_in_memory`` builds an abstract ``Task``), so it is not used.

As shipped, mergekit-evolve cannot run here. The patches, all made from this process (and,
through Ray's ``worker_process_setup_hook``, from each Ray worker) before mergekit's code
runs; none touches mergekit's or lm-eval's files (``MERGEKIT_CPU_RAY_CPUS``, default 2, is
the CPU count Ray is given):

1. Every Ray actor and task of mergekit-evolve asks for ``num_gpus=1``, and a CPU-only Ray
   cluster has no GPU to give, so the search would wait forever: Ray is started with one
   *logical* GPU (``ray.init(num_gpus=1)``). Nothing uses CUDA (patch 3 and the
   ``--no-merge-cuda`` merge).
2. The on-disk evaluator calls the accelerator module's ``empty_cache`` before each merge,
   and ``torch.cpu`` has none (torch 2.13): a no-op is added.
3. mergekit asks lm-eval for its ``hf`` model without a device, and HFLM's default,
   ``"cuda"``, is taken as given and fails without CUDA: HFLM is made to use ``"cpu"``.
4. ``mergekit.evo.actors`` names ``lm_eval.models.vllm_causallms.VLLM`` in a class
   annotation, and that lm-eval module imports vLLM, which is not installed: an empty
   stand-in module is registered under that name before mergekit is imported.
5. Each worker runs torch on one thread (``torch.set_num_threads(1)``, and
   ``OMP_NUM_THREADS=1`` in its environment).

Nothing else changes: mergekit's genome, its merge (bfloat16, ``int8_mask``), lm-eval's
evaluator and ``cma.fmin2`` with mergekit's defaults (x0 = weight 1/models and density 1,
``sigma0`` 1/6, no bounds: a weight is read as its absolute value and a density is clamped
to [0, 1], population 4 + 3 ln(genes)) run as shipped. vLLM is not installed and not used.
"""

from __future__ import annotations

import os
import sys


def patch_mergekit() -> None:
    """The driver: the workers' patches, and Ray started with a logical GPU (patch 1)."""
    import ray

    patch_worker()
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    ray.init(
        num_cpus=int(os.environ.get("MERGEKIT_CPU_RAY_CPUS", "2")),
        num_gpus=1,
        include_dashboard=False,
        runtime_env={  # every worker process runs patch_worker first
            "env_vars": {
                "OMP_NUM_THREADS": threads,
                "MKL_NUM_THREADS": threads,
                "HF_DATASETS_OFFLINE": "1",
                "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": os.path.dirname(os.path.abspath(__file__)),
            },
            "worker_process_setup_hook": "mergekit_evolve_cpu.patch_worker",
        },
        log_to_driver=True,
    )


def patch_worker() -> None:
    """Patches 2 to 5, in every process that runs mergekit's code."""
    import types

    import lm_eval.models
    import lm_eval.models.huggingface
    import torch

    torch.set_num_threads(1)  # patch 5
    if not hasattr(torch.cpu, "empty_cache"):  # patch 2
        torch.cpu.empty_cache = lambda: None
    if "lm_eval.models.vllm_causallms" not in sys.modules:  # patch 4
        stub = types.ModuleType("lm_eval.models.vllm_causallms")
        stub.VLLM = type("VLLM", (), {})
        sys.modules[stub.__name__] = stub
        lm_eval.models.vllm_causallms = stub
    hflm = lm_eval.models.huggingface.HFLM
    if getattr(hflm, "_cpu_patched", False):
        return
    shipped_init = hflm.__init__

    def init_on_cpu(self, *args, **kwargs):  # patch 3
        kwargs["device"] = "cpu"
        shipped_init(self, *args, **kwargs)

    hflm.__init__ = init_on_cpu
    hflm._cpu_patched = True


DEFAULTS = {
    "--no-in-memory": None,
    "--strategy": "pool",
    "--num-gpus": "1",
    "--no-merge-cuda": None,
    "--batch-size": "1",
    "--no-reshard": None,
}


def main() -> None:
    args = sys.argv[1:]
    for option, value in DEFAULTS.items():
        stem = option.removeprefix("--no-").removeprefix("--")
        if not any(a.lstrip("-").removeprefix("no-").split("=")[0] == stem for a in args):
            args += [option] if value is None else [option, value]
    patch_mergekit()
    from mergekit.scripts.evolve import main as evolve

    evolve.main(args=args, prog_name="mergekit-evolve", standalone_mode=True)


if __name__ == "__main__":
    main()
