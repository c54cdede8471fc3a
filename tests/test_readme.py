"""The README's Python example runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert blocks, "the README lost its Python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert "torch.Size([1, 3, 64])" in capsys.readouterr().out


def test_readme_and_ci_share_the_test_command():
    commands = re.findall(r"```bash\n(pip install torch==2\.13\.0 .*?)\n```", README.read_text())
    assert len(commands) == 2, "the README must show exactly two set-up commands"
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci


def test_readme_is_a_space_card():
    import yaml

    text = README.read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["sdk"] == "gradio" and front["hf_oauth"] is True
    assert (README.parent / front["app_file"]).is_file()
    assert {"write-repos", "manage-repos"} <= set(front["hf_oauth_scopes"])
    assert front["suggested_hardware"] and front["tags"]


def test_the_docker_image_runs_the_server_as_user_1000_on_7860():
    dockerfile = (README.parent / "Dockerfile").read_text()
    assert "--uid 1000" in dockerfile and "USER user" in dockerfile
    assert "EXPOSE 7860" in dockerfile and '"mergebot", "serve"' in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/api/health" in dockerfile.split("HEALTHCHECK")[1]


def test_the_readme_documents_a_docker_space_on_the_dockerfile_port():
    """The front matter a Docker Space needs, the secrets and the persistent storage."""
    import yaml

    text = README.read_text()
    docker = next(
        yaml.safe_load(block)
        for block in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
        if "sdk: docker" in block
    )
    assert docker == {"sdk": "docker", "app_port": 7860}
    assert f"EXPOSE {docker['app_port']}" in (README.parent / "Dockerfile").read_text()
    for needed in ("`HF_TOKEN`", "`MERGEBOT_SECRET_KEY`", "`/data`", "MERGEBOT_WORK_DIR=/data/"):
        assert needed in text


def test_the_readme_points_only_at_files_in_the_project():
    text = README.read_text()
    assert "shared/" not in text, "the README must not point outside the project"
    paths = re.findall(r"`((?:docs|benchmarks|service|merge_engine|tests)/[\w./-]+\.\w+)`", text)
    assert "docs/methods.md" in paths and "docs/architecture.md" in paths
    for path in paths:
        assert (README.parent / path).is_file(), f"the README names {path}, which does not exist"


@pytest.mark.slow
def test_the_demo_runs_as_the_readme_says(tmp_path):
    """The README's main job (`python spaces_app.py`, no token: the demo) and its demo lines, run
    as written from another folder: a merge of the demo's models lands on the demo hub."""
    from service_env import MergebotProcess, free_port, wait_until

    demo_block = next(
        block
        for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL)
        if "demo-recipe.yaml" in block
    )
    web, hub = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MERGEBOT_"))}
    env.update(
        MERGEBOT_WORK_DIR=str(tmp_path / "mergebot-data"),
        HF_HOME=str(tmp_path / "hf-home"),
        GRADIO_SERVER_PORT=str(web),
        MERGEBOT_SANDBOX_PORT=str(hub),
        PYTHONUNBUFFERED="1",
    )
    space = MergebotProcess(
        [],
        env,
        tmp_path / "space.log",
        command=[sys.executable, "spaces_app.py"],
        cwd=README.parent,
    )
    try:
        wait_until(lambda: "mergebot serving on" in space.log, "the demo to start")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        # someone logged in to the real Hub: the demo line still asks without a token
        (tmp_path / "hf-home").mkdir(exist_ok=True)
        (tmp_path / "hf-home" / "token").write_text("hf_a_saved_login_the_sandbox_refuses")
        ran = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", demo_block],
            cwd=elsewhere,
            env={**env, "MERGEBOT_SERVER": f"http://127.0.0.1:{web}"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert f"succeeded http://127.0.0.1:{hub}/mergebot/demo-ties" in ran.stdout
        assert "mergebot/demo-ties" in ran.stdout.splitlines()[-1]  # `mergebot jobs` lists it
        # one line says what the local sign-in does, instead of Gradio's warning twice
        assert "Gradio does not support OAuth" not in space.log
        assert space.log.count("'Sign in with Hugging Face' button is a local stand-in") == 1
        assert "signs you in as demo" in space.log
    finally:
        space.stop()


def test_the_readme_says_which_torch_build_its_setup_installs():
    setup = " ".join(README.read_text().split("## Set up")[1].split("## Use")[0].split())
    assert "CPU build" not in setup.split("```bash")[0].replace("CPU-only build", "")
    assert "CUDA build" in setup
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in setup
