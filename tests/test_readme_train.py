"""The README's "Train together" example runs as shown: three peers reach epoch 12, the newcomer by download."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_readme_train_together_example_runs(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Train together"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "train_together.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = sorted(line for line in out.stdout.splitlines() if line.startswith("peer "))
    assert [line.split(":")[0] for line in lines] == ["peer 0", "peer 1", "peer 2"], out.stdout
    for line in lines:
        assert "epoch 12," in line
        assert float(re.search(r"accuracy ([0-9.]+)", line).group(1)) > 0.6, line
    assert "state downloads 1" in lines[2]  # the newcomer downloaded the swarm's state
