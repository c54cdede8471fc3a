"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

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
