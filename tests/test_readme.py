"""Every Python block of the README runs as written (the drop-in harness snippet, which names the
published files, runs in tests/tta/test_mgtta_inputs.py with those files built)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
TESTED_ELSEWHERE = ("MGTTADropIn(",)  # tests/tta/test_mgtta_inputs.py::test_readme_drop_in_example_runs


def _block(marker: str) -> str:
    return next(b for b in BLOCKS if marker in b)


def test_every_python_block_has_a_test():
    markers = ("MGTTA(model", "MGGOptimizer(norm_params", *TESTED_ELSEWHERE)
    untested = [b.splitlines()[0] for b in BLOCKS if not any(m in b for m in markers)]
    assert not untested, f"README Python blocks without a test: {untested}"


def test_readme_adaptation_example_runs():
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(_block("MGTTA(model"), "README.md", "exec"), scope)
    adapter = scope["adapter"]
    assert scope["logits"].shape == (16, 10) and torch.isfinite(scope["logits"]).all()
    assert adapter.total_updates == 3
    assert adapter.num_updates == 0  # reset() at the end


def test_readme_optimizer_example_runs_and_updates_only_the_norm_params():
    import timm

    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(_block("MGGOptimizer(norm_params"), "README.md", "exec"), scope)
    model, opt = scope["model"], scope["opt"]
    torch.manual_seed(0)
    before = dict(timm.create_model("resnet18", pretrained=False, num_classes=10).named_parameters())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n].detach())}
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert changed and changed <= {f"{n}.{k}" for n in norms for k in ("weight", "bias")}
    assert all(int(opt.state[p]["step"]) == 2 for p in opt.param_groups[0]["params"])
