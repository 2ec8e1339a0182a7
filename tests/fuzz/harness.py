"""Coverage-guided fuzzing of one target with atheris (libFuzzer), or with tests/fuzz/mutate.py where atheris is
not installed. Run by tests/fuzz/test_fuzz.py and `make fuzz`; by hand:

    .venv/bin/python tests/fuzz/harness.py TARGET CORPUS_DIR [SEED_DIR ...] -max_total_time=60 -artifact_prefix=DIR/

TARGET is a key of tests/fuzz/targets.TARGETS. libFuzzer grows CORPUS_DIR with the inputs that reach new code and
writes an input that escapes the target's contract as DIR/crash-<sha1> (a slow one as timeout-..., a memory hog as
oom-...); the final stats line `stat::number_of_executed_units` is the execution count.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# pydicom and nibabel warn about every malformed element; a fuzz run feeds them nothing else.
warnings.simplefilter("ignore")
logging.disable(logging.CRITICAL)


# atheris instruments whole top-level packages (its `include` keeps only the part before the first dot), so each
# target names only the packages that parse its bytes, and pydicom's data dictionaries (a 5 MB dict literal, no
# branches) are left out: instrumenting everything took 6 s to start idle and over 180 s on a loaded 2-core box.
INSTRUMENT = {
    "dicom_header": ["medxfer", "pydicom"],
    "dicom_fast": ["medxfer", "pydicom"],
    "nifti": ["medxfer", "nibabel"],
    "spec": ["medxfer", "yaml"],
}
SKIP = ["pydicom._dicom_dict", "pydicom._private_dict", "pydicom._uid_dict"]


def main() -> None:
    target = sys.argv[1]
    args = [sys.argv[0], *sys.argv[2:]]
    try:
        import atheris
    except ImportError:
        import mutate

        mutate.main(target, args[1:])
        return
    import numpy  # noqa: F401  (compiled; not worth instrumenting, and imported first so it is skipped)

    with atheris.instrument_imports(include=INSTRUMENT[target], exclude=SKIP):
        import targets
    fn = targets.TARGETS[target]
    atheris.Setup(args, fn)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
