"""The fused kernels compile for an H100 (sm_90) with the launch table's configs and do not spill
beyond the budget of ``bench/compile_sm90.py``.

No GPU is needed: Triton lowers to PTX and the ptxas bundled with the triton wheel assembles it.
This catches GPU-only compile errors that the interpreter (which runs the kernels as numpy) cannot.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PTXAS = Path(pytest.importorskip("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
KERNELS = ("step", "forward", "step-bf16", "step-fp64", "step-bf16W", "advance")


@pytest.mark.skipif(not PTXAS.exists(), reason=f"no bundled ptxas at {PTXAS}")
def test_kernels_compile_for_sm90_without_spills():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compile_sm90.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report  # 1 when any configuration spills beyond the budget
    compiled = {line.split()[0] for line in result.stdout.splitlines() if re.search(r"\d+ registers", line)}
    assert compiled == set(KERNELS), report
