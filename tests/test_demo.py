"""The demo runs end to end."""
from __future__ import annotations

import subprocess
import sys


def test_demo_runs_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "deltatune.cli", "demo", "--out", str(tmp_path / "demo"),
                           "--steps", "40", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    before = float(out.split("accuracy before fine-tuning: ")[1].split()[0])
    after = float(out.split("accuracy after 40 steps: ")[1].split()[0])
    assert after >= before + 0.25 and after >= 0.85, out
    assert "predictions identical = True" in out and "merged into the base weights: predictions identical = True" in out
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "demo" / "adapter-peft" / "adapter_config.json").is_file()
    assert (tmp_path / "demo" / "run" / "metrics.jsonl").is_file()
