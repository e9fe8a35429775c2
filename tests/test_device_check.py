"""The real-size device check (benchmarks/device_check_real_size.py) runs on a GPU only when one is lent; its
`--tiny` mode runs the same sections on CPU so that the script cannot rot unnoticed."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_device_check_tiny_mode_passes_every_section(tmp_path):
    output = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "device_check_real_size.py"), "--tiny", "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    sections = ("build", "inputs", "forward", "generate", "train")
    assert report["ok"] is True and all(report[name]["ok"] for name in sections), report
    assert report["forward"]["trigger_positions"] == [2, 2]
    assert report["generate"]["generated_tokens"] == report["generate"]["new_tokens"]
    assert report["train"]["grad_norms"]["lora_B"] > 0
