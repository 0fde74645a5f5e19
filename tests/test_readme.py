"""The README's ten-line adaptation example runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_adaptation_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "MGTTA(" in b)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    adapter = scope["adapter"]
    assert scope["logits"].shape == (16, 10) and torch.isfinite(scope["logits"]).all()
    assert adapter.total_updates == 3
    assert adapter.num_updates == 0  # reset() at the end
