"""The help and the wording of the command line: ``--help`` without torch, defaults shown as typed,
titled option sections, per-command ``--seed`` help, the program named as invoked."""

import os
import re
import subprocess
import sys

import pytest

from mgg_fast.cli import main

HEAVY = ("torch", "timm", "triton")


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def as_module(*argv: str) -> subprocess.CompletedProcess:
    """``python -m mgg_fast ARGV`` in a fresh interpreter (runpy, as ``-m`` does), which then
    prints on its last stderr line the heavy packages it loaded."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['mgg_fast', *{list(argv)!r}]\n"
        "try:\n"
        "    runpy.run_module('mgg_fast', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exc:\n"
        "    status = exc.code\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}), status, file=sys.stderr)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["adapt", "--help"],
        ["train", "--help"],
        ["stats", "--help"],
        ["realnet", "--help"],
        ["bench", "--help"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_help_loads_no_torch_timm_or_triton(argv):
    done = as_module(*argv)
    loaded, status = done.stderr.strip().splitlines()[-1].rsplit(" ", 1)
    assert status == "0", done.stderr
    assert loaded == "[]", f"{' '.join(argv)} imported {loaded}"
    assert "usage: python" in done.stdout and "-m mgg_fast" in done.stdout


def sections(help_text: str) -> dict[str, set[str]]:
    """The options each section of a help text defines, by title (``options``, argument groups)."""
    parts = re.split(r"^(\S[^\n]*):\n", help_text, flags=re.M)
    return {
        title: set(re.findall(r"^  (?:-\w, )?(--[\w-]+)", text, flags=re.M))
        for title, text in zip(parts[1::2], parts[2::2], strict=True)
    }


def test_adapt_help_keeps_bundled_and_own_model_options_apart(capsys):
    code, out, _ = run_cli(capsys, "adapt", "--help")
    assert code == 0
    found = sections(out)
    own = found.pop("your own model and data (timm, with --model)")
    assert own >= {"--model", "--checkpoint", "--method", "--episodic", "--resume", "--images", "--workers"}
    assert found.pop("the bundled models (without --model)") == {
        "--regime",
        "--archs",
        "--n-test",
        "--source-epochs",
        "--cache-dir",
    }
    assert found.pop("options") >= {"--mgg", "--data", "--batch-size", "--out", "--device", "--seed"}
    assert not [title for title in found if title != "usage: python -m mgg_fast adapt [-h] [--mgg MGG]"]


@pytest.mark.parametrize("command", ["adapt", "train", "stats", "realnet", "bench"])
def test_help_shows_defaults_as_typed(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    text = " ".join(out.split())  # argparse wraps lines
    assert "['" not in text and "(default: None)" not in text and "(default: False)" not in text
    assert "(default: {})" not in text
    if command == "adapt":
        assert "(default: demo)" in text  # the regime; --archs is then the regime's
        assert "(default: noadapt,tent,adam, and mgg when --mgg is given)" in text


def test_seed_help_says_what_each_command_seeds(capsys):
    helps = {}
    for command in ("adapt", "train", "stats", "realnet", "bench"):
        _, out, _ = run_cli(capsys, command, "--help")
        text = re.search(r"^  --seed SEED\s+(.*?)\n  -", out, flags=re.M | re.S).group(1)
        helps[command] = " ".join(text.split())
    assert "parameters and gradients" in helps["bench"] and "corruption" not in helps["bench"]
    assert "corruption" not in helps["stats"] and "images" in helps["stats"]
    assert "crops" in helps["realnet"]
    assert len(set(helps.values())) == len(helps)


def test_errors_name_the_program_as_invoked(capsys):
    done = as_module("adapt", "--device", "cpu")  # bundled models without --mgg
    error = done.stderr.strip().splitlines()[0]
    python = re.escape(os.path.basename(sys.executable))
    assert re.match(rf"{python} -m mgg_fast adapt: error: the bundled models need --mgg FILE", error), error
    code, _, err = run_cli(capsys, "adapt", "--device", "cpu")  # the console script's main()
    assert code == 2 and err.startswith("mgg-fast adapt: error: the bundled models need --mgg")


def test_demo_offers_every_backend_and_recipe(capsys):
    """The demo's --backend choices were once auto/reference/triton, without the CPU step that
    ``auto`` picks on the CPU, and its --recipes help named three of the five recipes."""
    from mgg_fast.cli import build_parser
    from mgg_fast.evaluation.bundled.config import RECIPES
    from mgg_fast.optim.functional import BACKENDS

    parser = build_parser("demo")
    for backend in BACKENDS:
        assert parser.parse_args(["demo", "--backend", backend]).backend == backend
    _, out, _ = run_cli(capsys, "demo", "--help")
    text = " ".join(out.split())
    assert "auto: the fused step of the device" in text
    assert f"side by side: {', '.join(RECIPES)}" in text
