"""What the MGG's memory does over a long continual stream, with and without being carried.

Runs the bundled benchmark's continual stream (every test corruption in turn, never reset) once
with the MGG's per-coordinate memory carried from step to step (as published) and once reset
every step (the memoryless ablation), with the same trained MGG, learning rate and batches, and
records per step: the batch's accuracy, how far the memory has moved from the learned one
(``|W - W1|`` and ``|b - b1|``, root mean square over coordinates), the MGG's inputs
(``m~``, ``g~``), its inner learning rate ``eta``, and its output ``u`` (mean ``|u|`` and the
fraction with ``|u| > 0.9``, i.e. saturated toward a sign step).

    python bench/memory_probe.py --arch resnet --lr 0.025 --out bench/memory_probe

writes ``probe.json`` and ``probe.png`` (one panel per quantity) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mgg_fast import MGG, MGTTA
from mgg_fast.core.reference import bias_corrections, inner_lr
from mgg_fast.evaluation.bundled import assets
from mgg_fast.evaluation.bundled.benchmark import clean_source_stats
from mgg_fast.evaluation.bundled.config import BenchmarkConfig
from mgg_fast.evaluation.bundled.data import corrupted_split, to_tensor
from mgg_fast.evaluation.bundled.source_models import source_model
from mgg_fast.evaluation.streams import make_batches


def bundled_mgg(arch: str, lr: float) -> MGG:
    """The shipped demo-recipe MGG of ``arch`` (seed 0) meta-trained at adaptation lr ``lr``."""
    for name, entry in assets.read_manifest()["files"].items():
        if (
            entry.get("kind") == "MGG"
            and entry["arch"] == arch
            and entry["eval_lr"] == lr
            and entry["seed"] == 0
        ):
            return MGG.load(assets.find(name))
    raise SystemExit(f"no shipped MGG for {arch} at lr {lr:g}")


def probe(arch: str, lr: float, n_test: int, carry: bool) -> list[dict[str, float]]:
    cfg = BenchmarkConfig(n_test=n_test)
    torch.manual_seed(0)
    model = source_model(arch, seed=0, progress=False).model
    mgg = bundled_mgg(arch, lr)
    stats = clean_source_stats(model)
    adapter = MGTTA(model, optimizer="mgg", mgg=mgg, lr=lr, source_stats=stats, carry_memory=carry)
    opt = adapter.optimizer
    params = opt.param_groups[0]["params"]
    beta1, beta2 = opt.param_groups[0]["betas"]
    w = mgg.weights()
    W1, b1 = mgg.W1.detach(), mgg.b1.detach()[:, 0, :]
    rows = []
    for name in cfg.test_corruptions():
        data = corrupted_split("test", name, 5, n_test, seed=0)
        for x, y in make_batches(data, cfg.batch_size, "cpu", to_tensor):
            before = torch.cat([p.detach().reshape(-1).clone() for p in params])
            acc = float((adapter(x).argmax(1) == y).float().mean())
            after = torch.cat([p.detach().reshape(-1) for p in params])
            st = [opt.state[p] for p in params]
            m = torch.cat([s["exp_avg"].reshape(-1) for s in st])
            v = torch.cat([s["exp_avg_sq"].reshape(-1) for s in st])
            g = torch.cat([p.grad.reshape(-1) for p in params])
            step = float(st[0]["step"])
            bc1, bc2 = bias_corrections(step, beta1, beta2)
            denom = torch.sqrt(v / bc2) + 1e-8
            x_in = torch.stack(((m / bc1) / denom, g / denom), dim=-1)
            W = torch.cat([s["memory_W"].reshape(-1, *W1.shape) for s in st])
            b = torch.cat([s["memory_b"].reshape(-1, *b1.shape) for s in st])
            u = (before - after) / lr
            rows.append(
                {
                    "corruption": name,
                    "step": step,
                    "accuracy": acc,
                    "W_drift_rms": float((W - W1).pow(2).mean().sqrt()),
                    "b_drift_rms": float((b - b1).pow(2).mean().sqrt()),
                    "m_tilde_abs": float(x_in[:, 0].abs().mean()),
                    "g_tilde_abs": float(x_in[:, 1].abs().mean()),
                    "eta_mean": float(inner_lr(x_in, w).detach().mean()),
                    "u_abs": float(u.abs().mean()),
                    "u_saturated": float((u.abs() > 0.9).float().mean()),
                }
            )
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet")
    parser.add_argument("--lr", type=float, default=0.025)
    parser.add_argument("--n-test", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("bench/memory_probe"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = {carry: probe(args.arch, args.lr, args.n_test, carry) for carry in (True, False)}
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "arch": args.arch,
        "lr": args.lr,
        "n_test": args.n_test,
        "carried": runs[True],
        "reset": runs[False],
    }
    (args.out / "probe.json").write_text(json.dumps(result, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        "accuracy",
        "W_drift_rms",
        "b_drift_rms",
        "eta_mean",
        "u_abs",
        "u_saturated",
        "m_tilde_abs",
        "g_tilde_abs",
    ]
    fig, axes = plt.subplots(2, 4, figsize=(16, 6))
    for ax, key in zip(axes.flat, keys, strict=True):
        for carry, label in ((True, "memory carried"), (False, "memory reset every step")):
            ax.plot([r[key] for r in runs[carry]], label=label, lw=0.8)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step (continual stream)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{args.arch}, lr {args.lr:g}: the MGG's memory over the continual stream", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out / "probe.png", dpi=80)
    for carry in (True, False):
        accs = [r["accuracy"] for r in runs[carry]]
        print(f"carry={carry}: mean accuracy {100 * sum(accs) / len(accs):.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
