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
