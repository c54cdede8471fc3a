"""Run ``mergekit-evolve`` (mergekit 0.1.5) on a machine without a GPU, for
``bench_vs_mergekit_evolve.py``. This file runs in the mergekit benchmark venv (never in
mergebot's environment; mergekit is not a dependency of mergebot):

    OMP_NUM_THREADS=1 /work/venvs/mergekit/bin/python benchmarks/mergekit_evolve_cpu.py \\
        CONFIG.yaml --storage-path DIR --max-fevals 60 --random-seed 0 [other mergekit-evolve options]

Every option is mergekit-evolve's own; this runner adds ``--in-memory --strategy pool
--num-gpus 1 --no-merge-cuda --batch-size 1 --no-reshard`` unless they are given. As
shipped, mergekit-evolve cannot start here: every Ray actor and task asks for
``num_gpus=1`` and a CPU-only Ray cluster has no GPU to give, so the search waits forever.
The patches, all made from this process before mergekit's command runs, none to its files:

1. Ray is started with one *logical* GPU (``ray.init(num_gpus=1)``): the actor that asks for
   it is scheduled; nothing uses CUDA, since the merge runs with ``--no-merge-cuda`` (device
   ``cpu``) and lm-eval's HF model is given the in-memory model that lives on the CPU.
2. ``torch.cpu`` has no ``empty_cache`` in some torch builds; mergekit's on-disk evaluator
   calls the accelerator module's ``empty_cache`` before each merge: a no-op is added where
   it is missing.
3. The in-memory evaluator hands lm-eval's ``HFLM`` a model made from a config, whose
   ``name_or_path`` is empty, so HFLM cannot find a tokenizer: the patched ``HFLM`` is given
   the first source's tokenizer (the genome's tokenizer donor) and ``device="cpu"``.
5. ``mergekit.evo.actors`` names ``lm_eval.models.vllm_causallms.VLLM`` in a class
   annotation, and that lm-eval module imports vLLM: without vLLM the import fails. An empty
   stand-in module is registered under that name before mergekit is imported.
4. The worker processes get one torch thread (``torch.set_num_threads(1)`` when the actor
   starts, besides ``OMP_NUM_THREADS=1`` in their environment).

Nothing else changes: mergekit's genome, its merge (bfloat16, ``int8_mask``), lm-eval's
evaluator and ``cma.fmin2`` with mergekit's defaults (x0 = weight 1/models and density 1,
``sigma0`` 1/6, no bounds: a weight is read as its absolute value and a density is clamped
to [0, 1], population 4 + 3 ln(genes)) run as shipped. vLLM is not installed and not used.
"""

from __future__ import annotations

import os
import sys


def patch_mergekit() -> None:
    """The driver: the worker's patches, and Ray started with a logical GPU (patch 1)."""
    import ray

    patch_worker()
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    ray.init(  # patch 1
        num_cpus=int(os.environ.get("MERGEKIT_CPU_RAY_CPUS", "2")),
        num_gpus=1,
        include_dashboard=False,
        runtime_env={  # every worker process runs patch_worker first
            "env_vars": {
                "OMP_NUM_THREADS": threads,
                "MKL_NUM_THREADS": threads,
                "MERGEKIT_CPU_TOKENIZER": os.environ["MERGEKIT_CPU_TOKENIZER"],
                "HF_DATASETS_OFFLINE": "1",
                "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": os.path.dirname(os.path.abspath(__file__)),
            },
            "worker_process_setup_hook": "mergekit_evolve_cpu.patch_worker",
        },
        log_to_driver=True,
    )


def patch_worker() -> None:
    """What every Ray worker process runs first: the same patches as the driver's, less Ray."""
    import types

    import lm_eval.models
    import lm_eval.models.huggingface
    import torch
    import transformers

    if "lm_eval.models.vllm_causallms" not in sys.modules:  # patch 5
        stub = types.ModuleType("lm_eval.models.vllm_causallms")
        stub.VLLM = type("VLLM", (), {})
        sys.modules[stub.__name__] = stub
        lm_eval.models.vllm_causallms = stub

    torch.set_num_threads(1)
    if not hasattr(torch.cpu, "empty_cache"):
        torch.cpu.empty_cache = lambda: None

    hflm = lm_eval.models.huggingface.HFLM
    if getattr(hflm, "_cpu_patched", False):
        return
    shipped_init = hflm.__init__

    def init_on_cpu(self, pretrained="gpt2", *args, **kwargs):  # patch 3
        kwargs["device"] = "cpu"  # HFLM's default, "cuda", is taken as given
        if not isinstance(pretrained, str) and kwargs.get("tokenizer") is None:
            kwargs["tokenizer"] = transformers.AutoTokenizer.from_pretrained(
                os.environ["MERGEKIT_CPU_TOKENIZER"]
            )
        shipped_init(self, pretrained, *args, **kwargs)

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
