"""The package's shape: imports only go down the layers (``cli → evaluation → tta → optim →
core``; kernels stand on the core alone; nothing imports the CLI), no import cycle (imports
inside functions count), no module grows past about 600 lines, and the README stays a guide."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "kernels": 0, "optim": 1, "tta": 2, "evaluation": 3, "cli": 4}
MAX_MODULE_LINES = 600
MAX_README_LINES = 300
MAX_README_DATED = 3


def _modules() -> dict[str, Path]:
    found = {}
    for top, prefix in (("mgg_fast", "mgg_fast"), ("kernels", "mgg_fast.kernels")):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file, by the longest name known
    (``from a.b import c`` is ``a.b.c`` when that is a module, else ``a.b``)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_imports_only_go_down_the_layers():
    wrong = []
    for name, targets in GRAPH.items():
        here = _layer(name)
        for target in targets:
            there = _layer(target)
            if target.startswith("mgg_fast.cli") and not (here == "cli" or name == "mgg_fast.__main__"):
                wrong.append(f"{name} imports the CLI ({target})")
            elif here == "kernels" and there not in ("kernels", "core"):
                wrong.append(f"{name} (a kernel) imports {target}")
            elif here is not None and there is not None and LAYERS[there] > LAYERS[here]:
                wrong.append(f"{name} ({here}) imports {target} ({there}), a layer above it")
            elif here is not None and there is None and target != "mgg_fast":
                wrong.append(f"{name} ({here}) imports {target}, which is in no layer")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v] - {"mgg_fast"}:  # the top package's lazy re-exports are not logic
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_kernels_import_without_the_adaptation_stack():
    """Loading the kernels loads the core alone (the top package re-exports lazily)."""
    import subprocess
    import sys

    code = (
        "import sys, mgg_fast.kernels.mgg_step, mgg_fast.kernels.mgg_forward; "
        "print(sorted(m for m in sys.modules if m.startswith('mgg_fast') and 'kernels' not in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out)
    assert all(m in ("mgg_fast", "mgg_fast.core") or m.startswith("mgg_fast.core.") for m in loaded), loaded


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = MODULES[name].read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{MODULES[name]} has {lines} lines: split it by what it holds"


def test_readme_is_a_guide_not_a_lab_notebook():
    lines = (ROOT / "README.md").read_text().splitlines()
    dated = [line for line in lines if re.search(r"20\d\d-\d\d-\d\d|\d\d:\d\d UTC", line)]
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines: measurements go to bench/"
    assert len(dated) <= MAX_README_DATED, dated
