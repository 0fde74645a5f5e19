"""The built wheel ships the kernels only as the subpackage mgg_fast.kernels."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_kernels_as_subpackage(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("mgg_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mgg_fast/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names), "no top-level kernels package"
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
    )
    probe = (
        "import importlib.util, sys; sys.path.insert(0, sys.argv[1]); import mgg_fast.kernels as k; "
        "assert k.__file__.startswith(sys.argv[1]), k.__file__; "
        "assert importlib.util.find_spec('kernels') is None"
    )
    subprocess.run([sys.executable, "-c", probe, str(target)], check=True, cwd=tmp_path)
