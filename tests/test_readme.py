"""The README's complete example runs as written."""

import os
import re
import subprocess
import sys



README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_complete_example_runs(tmp_path):
    text = open(README, encoding="utf-8").read()
    section = text.split("## A complete example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "answer.png").exists()


def test_first_lines_are_the_two_commands():
    blocks = re.findall(r"```bash\n(.*?)```", open(README, encoding="utf-8").read(), re.S)
    assert "pip install -e" in blocks[0] and "nextchat-quickstart" in blocks[0]
    assert blocks[1].strip() == ".venv/bin/python -m pytest tests -q"
