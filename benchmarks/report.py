"""Markdown summary of benchmarks/results/*.json, for the README's Performance section.

``python -m benchmarks.report`` prints the table; it does not edit the README.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.run_all import BENCHMARKS


def load(results: Path | None = None) -> list[dict[str, Any]]:
    folder = results or common.results_dir()
    return [json.loads((folder / f"{n}.json").read_text()) for n in BENCHMARKS if (folder / f"{n}.json").is_file()]


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| benchmark | measure | value | target | met |", "|---|---|---|---|---|"]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['status']}: {r['reason']} | | | |")
            continue
        for key, e in r["ratios"].items():
            cmp = ">=" if e["higher_is_better"] else "<="
            target = f"{cmp} {e['target']}" if e["target"] is not None else "-"
            met = {True: "yes", False: "**no**", None: "-"}[e["met"]]
            lines.append(f"| {r['name']} ({r['size']}) | {key} | {e['value']:.3g} | {target} | {met} |")
    machines = {
        json.dumps(
            {k: r["machine"].get(k) for k in ("cpu_model", "logical_cores", "torch_threads", "gpu", "memory_gib")},
            sort_keys=True,
        )
        for r in results
    }
    dates = sorted({r["created"][:10] for r in results})
    lines.append("")
    lines.append(
        f"Measured {', '.join(dates)}; machine(s): "
        + "; ".join(
            f"{m['cpu_model']}, {m['logical_cores']} cores, torch threads {m['torch_threads']}, "
            f"{m['memory_gib']} GiB, GPU {m['gpu'] or 'none'}"
            for m in map(json.loads, sorted(machines))
        )
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(load()))
