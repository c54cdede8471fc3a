"""The main job as the README runs it: ``python spaces_app.py`` without ``HF_TOKEN`` starts the
sandbox hub with example models beside the Space's server, and ``mergebot submit`` /
``mergebot jobs`` drive it; the demo's repos and jobs survive a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from service_env import Api, MergebotProcess, free_port, wait_until

pytestmark = pytest.mark.slow

RECIPE = """merge_method: slerp
base_model: demo/math
models:
  - model: demo/math
  - model: demo/code
parameters: {t: 0.3}
"""


ROOT = Path(__file__).resolve().parent.parent


def docker_healthcheck(port: int) -> subprocess.CompletedProcess:
    """The Dockerfile's HEALTHCHECK command, run here against ``port`` instead of 7860."""
    line = next(
        line
        for line in (ROOT / "Dockerfile").read_text().split("HEALTHCHECK", 1)[1].splitlines()
        if line.strip().startswith("CMD ")
    )
    command = json.loads(line.strip().removeprefix("CMD ").replace("7860", str(port)))
    assert command[0] == "python"
    return subprocess.run([sys.executable, *command[1:]], capture_output=True, timeout=60)


def test_a_deployed_space_without_a_token_refuses_to_start(tmp_path):
    """On a Space (SPACE_ID set) the demo hub would serve links no visitor can reach."""
    from service.server import NO_TOKEN_ON_A_SPACE

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MERGEBOT_"))}
    env.update(
        SPACE_ID="someone/mergebot",
        MERGEBOT_WORK_DIR=str(tmp_path / "work"),
        HF_HOME=str(tmp_path / "hf"),
        GRADIO_SERVER_PORT=str(free_port()),
        MERGEBOT_SANDBOX_PORT=str(free_port()),
    )
    run = subprocess.run(
        [sys.executable, str(ROOT / "spaces_app.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert run.stderr == NO_TOKEN_ON_A_SPACE + "\n"
    assert not (tmp_path / "work" / "sandbox-hub").exists()


def test_the_space_without_a_token_runs_the_offline_demo(tmp_path):
    work = tmp_path / "work"
    port, hub_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MERGEBOT_"))}
    env.update(
        MERGEBOT_WORK_DIR=str(work),
        HF_HOME=str(tmp_path / "hf"),
        PYTHONUNBUFFERED="1",
        GRADIO_SERVER_PORT=str(port),
        MERGEBOT_SANDBOX_PORT=str(hub_port),
    )
    app = [sys.executable, str(ROOT / "spaces_app.py")]
    api = Api(port)

    def start() -> MergebotProcess:
        process = MergebotProcess([], env, tmp_path / "serve.log", command=app)
        wait_until(lambda: api.ready() or process.process.poll() is not None, "mergebot serve")
        assert api.ready(), process.log
        return process

    serve = start()
    try:
        assert f"sandbox hub on http://127.0.0.1:{hub_port}" in serve.log
        assert (
            "demo/chat, demo/math-lora, demo/sd-base, demo/sd-dreamy, demo/sd-photo;" in serve.log
        )
        demo_token = json.loads((work / "sandbox-hub" / "tokens.json").read_text())["demo"]
        (tmp_path / "recipe.yaml").write_text(RECIPE)
        client = {
            **env,
            "HF_TOKEN": demo_token,
            "HF_ENDPOINT": f"http://127.0.0.1:{hub_port}",
            "MERGEBOT_SERVER": api.url,
        }

        def mergebot(*command: str) -> str:
            done = subprocess.run(
                [sys.executable, "-m", "service.cli", *command],
                env=client,
                capture_output=True,
                text=True,
                check=True,
            )
            return done.stdout

        out = mergebot("submit", str(tmp_path / "recipe.yaml"), "--to", "demo/slerp", "--wait")
        assert f"succeeded http://127.0.0.1:{hub_port}/demo/slerp" in out, out
        job_id = out.split(":")[0]
        assert demo_token not in serve.log
        assert docker_healthcheck(port).returncode == 0

        serve.stop()
        serve = start()
        assert job_id in mergebot("jobs")
        details = mergebot("jobs", job_id)
        assert "succeeded" in details and "published" in details
        from huggingface_hub import HfApi

        hub = HfApi(endpoint=f"http://127.0.0.1:{hub_port}", token=demo_token)
        assert "model.safetensors" in hub.list_repo_files("demo/slerp")
    finally:
        serve.stop()
