"""The README's example runs as written (with its NVMe directory moved to a temporary one)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1
    code = blocks[0].replace('Path("/var/lib/kvstore")', f"Path({str(tmp_path)!r})")
    assert str(tmp_path) in code  # the example still names the directory this test replaces
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4"]
