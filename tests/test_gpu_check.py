"""benchmarks/gpu_check.py runs (on the CPU, shrunk): every check it makes on a GPU passes here too."""
import sys

import pytest
from helpers import ROOT


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    gpu_check.main(["--device", "cpu", "--quick", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "MISMATCH" not in out and out.count("| ok") >= 14, out
