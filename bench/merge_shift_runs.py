"""Merge single-seed ``demo`` runs into one multi-seed report (results.json, results.md, plot).

``python -m mgg_fast demo --seeds N`` runs the seeds one after the other in one process; on a
shared 2-core machine each seed can also run as its own process (``--seed S --seeds 1``, every
run under 10 minutes) and be merged here. The per-seed numbers are the same either way: a seed
fixes the source model, the corruptions, the MGG initialisation and the shuffles.

Run: ``python bench/merge_shift_runs.py OUT_DIR RUN_DIR [RUN_DIR ...]`` (each RUN_DIR holds a
``results.json`` written by ``demo``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mgg_fast.evaluation.bundled.report import format_text, write_reports
from mgg_fast.evaluation.bundled.summary import merge_results


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: merge_shift_runs.py OUT_DIR RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    out, runs = Path(argv[0]), [Path(a) / "results.json" for a in argv[1:]]
    missing = [str(r) for r in runs if not r.is_file()]
    if missing:
        print(f"merge_shift_runs.py: error: no results.json in {', '.join(missing)}", file=sys.stderr)
        return 1
    merged = merge_results([json.loads(r.read_text()) for r in runs])
    print(format_text(merged))
    paths = write_reports(merged, out)
    print(f"\nMerged {len(runs)} runs: {', '.join(map(str, paths.values()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
