"""A small byte mutator for machines without atheris: same command line subset, same outputs as libFuzzer.

Not coverage-guided: it mutates the seeds (bit flips, byte sets, interesting integers, cuts, inserts, splices)
until the time is up, and stops at the first input that escapes the target's contract (written as
ARTIFACT_PREFIX + crash-<sha1>, like libFuzzer). Understands -max_total_time=, -runs=, -artifact_prefix=, -seed=
and corpus folders.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
import traceback
from pathlib import Path

import targets

_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        if not b:
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            continue
        i = rng.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.randrange(256)
        elif op == 2:
            w = rng.choice((1, 2, 4))
            b[i : i + w] = (rng.choice(_INTERESTING) & (256**w - 1)).to_bytes(w, rng.choice(("little", "big")))
        elif op == 3:
            del b[i:]
        elif op == 4:
            del b[i : i + rng.randint(1, 64)]
        elif op == 5:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            other = rng.choice(pool)
            j = rng.randrange(len(other) + 1)
            b[i:] = other[j:]
    return bytes(b)


def main(target: str, argv: list[str]) -> None:
    opts = {a[1:].split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith("-") and "=" in a}
    dirs = [Path(a) for a in argv if not a.startswith("-")]
    pool = [f.read_bytes() for d in dirs if d.is_dir() for f in sorted(d.iterdir()) if f.is_file()] or [b""]
    fn = targets.TARGETS[target]
    rng = random.Random(int(opts.get("seed", "0")) or None)
    deadline = time.monotonic() + float(opts.get("max_total_time", "10"))
    runs, max_runs = 0, int(opts.get("runs", "-1"))
    prefix = opts.get("artifact_prefix", "./")
    while time.monotonic() < deadline and runs != max_runs:
        data = mutate(rng, rng.choice(pool), pool)
        runs += 1
        try:
            fn(data)
        except Exception:
            traceback.print_exc()
            out = Path(prefix + "crash-" + hashlib.sha1(data).hexdigest())
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
            print(f"Test unit written to {out}", file=sys.stderr)
            print(f"stat::number_of_executed_units: {runs}", file=sys.stderr)
            sys.exit(1)
    print(f"Done {runs} runs (mutate.py, no atheris)", file=sys.stderr)
    print(f"stat::number_of_executed_units: {runs}", file=sys.stderr)
