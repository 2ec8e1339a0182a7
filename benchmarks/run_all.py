"""Run the benchmarks: ``python -m benchmarks.run_all [--quick|--tiny] [--only NAME ...]`` (``make bench``).

Each benchmark prints its table and writes ``benchmarks/results/<name>.json``. A benchmark
that cannot run here (no data, no GPU, a stage missing) is recorded as skipped with the
reason; one that crashes is recorded as an error and the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# Order: cheap first, the long accuracy study last.
BENCHMARKS = ("data_path", "train_step", "ingest", "tracking", "inference", "gpu_amp", "accuracy", "accuracy_auto")


def run_one(name: str, size: str) -> dict[str, Any]:
    from benchmarks import common

    mod = importlib.import_module(f"benchmarks.{name}")
    t0 = time.perf_counter()
    try:
        result = mod.run(size)
    except common.Skip as exc:
        result = common.new_result(name, getattr(mod, "TITLE", name), size)
        result.update(status="skipped", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others' numbers
        result = common.new_result(name, getattr(mod, "TITLE", name), size)
        result.update(status="error", reason=f"{type(exc).__name__}: {exc}")
        result["notes"].append(traceback.format_exc(limit=6))
    if result.get("wall_s") is None:
        result["wall_s"] = round(time.perf_counter() - t0, 1)
    common.write_result(result)
    common.print_result(result)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run_all", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = ap.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_const", const="quick", dest="size", help="shorter runs (accuracy: 1 seed, fewer arms)"
    )
    size.add_argument(
        "--tiny",
        action="store_const",
        const="tiny",
        dest="size",
        help="seconds per benchmark; for the smoke test, numbers are meaningless",
    )
    ap.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME",
        help=f"run only these (repeatable or comma-separated): {', '.join(BENCHMARKS)}",
    )
    ap.add_argument("--results-dir", type=Path, default=None, help="result JSON folder (default benchmarks/results)")
    ap.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default benchmarks/work)")
    args = ap.parse_args(argv)

    # Set before any benchmark imports so isolated child processes inherit them.
    if args.results_dir is not None:
        os.environ["MEDXFER_BENCH_RESULTS"] = str(args.results_dir.resolve())
    if args.work_dir is not None:
        os.environ["MEDXFER_BENCH_WORK"] = str(args.work_dir.resolve())

    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            ap.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")

    results = [run_one(n, args.size or "full") for n in names]
    print()
    for r in results:
        print(f"{r['name']:<12} {r['status']:<8} {r['wall_s']:>8.1f}s  {r['reason'] or ''}")
    return 1 if any(r["status"] == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
