"""Run test code in a fresh Python process: what an SGLang worker process sees at start-up
(hooks installed at import, no state left by other tests)."""

import os
import subprocess
import sys
from pathlib import Path


def assert_prints_ok(code: str) -> None:
    """``code`` runs without SGLANG_PLATFORM set, exits 0 and prints ``ok`` last."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("SGLANG_PLATFORM", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
