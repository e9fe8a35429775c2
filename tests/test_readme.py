"""The README's complete example runs as written."""

import os
import re
import subprocess
import sys



README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_complete_example_runs(tmp_path):
    """The complete example, on the shipped tiny model, run as from the repository root (its `examples/` linked into
    a scratch folder, which receives `answer.png`): the model grounds the red circle it is asked about."""
    text = open(README, encoding="utf-8").read()
    section = text.split("## A complete example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "from_pretrained(folder)" in code and "boxes=" in code
    script = tmp_path / "example.py"
    script.write_text(code)
    (tmp_path / "examples").symlink_to(os.path.join(os.path.dirname(README), "examples"), target_is_directory=True)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "answer.png").exists()
    lines = result.stdout.strip().splitlines()
    assert "red circle" in lines[0] and any("red circle" in line for line in lines[1:]), result.stdout


def test_pipeline_example_runs_without_nextchat(tmp_path):
    """The first usage example: transformers' `pipeline` on the shipped folder, in a process that cannot import
    `nextchat` (remote code only), run from the repository root as written."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_save_load import BLOCKER

    text = open(README, encoding="utf-8").read()
    section = text.split("## Use it: `pipeline`", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'pipeline("grounded-image-text-to-text"' in code and 'pipeline("image-text-to-text"' in code
    (tmp_path / "blocker.py").write_text(BLOCKER)
    (tmp_path / "example.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "blocker.py"), str(tmp_path / "example.py")],
        cwd=os.path.dirname(README), env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert "red circle" in lines[0] and any(line.startswith(("a red circle", "the red circle")) for line in lines)


def test_first_lines_are_the_two_commands():
    blocks = re.findall(r"```bash\n(.*?)```", open(README, encoding="utf-8").read(), re.S)
    assert "pip install -e" in blocks[0] and "nextchat-quickstart" in blocks[0]
    assert blocks[1].strip() == ".venv/bin/python -m pytest tests -q"
