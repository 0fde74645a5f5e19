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
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "mgg_fast").rglob("__init__.py")}
    missing = sorted(pkg for pkg in packages if f"{pkg}/__init__.py" not in names)
    assert not missing, f"subpackages left out of the wheel: {missing}"
    assets = sorted(
        p.relative_to(ROOT).as_posix() for p in (ROOT / "mgg_fast").rglob("assets/*") if p.is_file()
    )
    assert all(a in names for a in assets), "bundled assets left out of the wheel"
    assert not any(n.startswith("kernels/") for n in names), "no top-level kernels package"
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
    )
    probe = (
        "import importlib.util, sys; sys.path.insert(0, sys.argv[1]); import mgg_fast.kernels as k; "
        "assert k.__file__.startswith(sys.argv[1]), k.__file__; "
        "import mgg_fast.cli, mgg_fast.evaluation.bundled.benchmark; "
        "assert importlib.util.find_spec('kernels') is None"
    )
    subprocess.run([sys.executable, "-c", probe, str(target)], check=True, cwd=tmp_path)
