"""The forked header scan (medxfer.io.dicom._scan_forked): same headers and pseudonym map as one process, also
when a child dies mid-scan (its chunks are read again by the parent)."""

from __future__ import annotations

import os
import time

import pytest
from helpers import write_series
from medxfer.io import dicom
from medxfer.io.phi import Pseudonymizer

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the forked scan needs os.fork")


def _paths(tmp_path):
    # 36 files: 3 chunks of <= 16, so a child has one to take while the parent holds another
    paths = [str(p) for p in write_series(tmp_path / "a", n=20) + write_series(tmp_path / "b", n=15, modality="MR")]
    (tmp_path / "junk").write_bytes(b"not dicom at all")
    return [*paths, str(tmp_path / "junk")]


def _same(tmp_path, want_pseudo, want, got_pseudo, got):
    assert [h.to_dict() for h in got] == [h.to_dict() for h in want]
    want_pseudo.write_map(tmp_path / "want.csv")
    got_pseudo.write_map(tmp_path / "got.csv")
    assert (tmp_path / "got.csv").read_text() == (tmp_path / "want.csv").read_text()


def _spy_chunks(monkeypatch, marks, die: bool = False) -> list[int]:
    """Patches the scan's chunk reader: a child leaves a file in ``marks`` (and dies there when ``die``); the
    parent holds its first chunk until a child has taken one, so the children's side is always exercised.
    Returns the sizes of the chunks the parent read."""
    marks.mkdir()
    parent, real, done_here = os.getpid(), dicom._scan_chunk, []

    def spied(chunk, pseudo, record):
        if os.getpid() != parent:
            (marks / str(os.getpid())).touch()
            if die:
                os._exit(3)  # killed mid-scan (OOM killer, a signal): no results come back
        elif not done_here:
            deadline = time.monotonic() + 30
            while not any(marks.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.01)
        done_here.append(len(chunk))
        return real(chunk, pseudo, record)

    monkeypatch.setattr(dicom, "_PROCESS_MIN_FILES", 1)
    monkeypatch.setattr(dicom, "_scan_chunk", spied)
    return done_here


@pytest.mark.parametrize("workers", [2, 3])
def test_forked_scan_matches_one_process_with_records(tmp_path, monkeypatch, workers):
    paths = _paths(tmp_path)
    one = Pseudonymizer(b"k" * 32)
    want, want_rec = dicom.scan_headers_records(paths, one, workers=1, record=lambda h: (h.path, h.instance_number))
    done_here = _spy_chunks(monkeypatch, tmp_path / "marks")
    monkeypatch.setattr(dicom, "_cpus", lambda: workers)
    forked = Pseudonymizer(b"k" * 32)
    got, got_rec = dicom.scan_headers_records(
        paths, forked, workers=workers, record=lambda h: (h.path, h.instance_number)
    )
    _same(tmp_path, one, want, forked, got)
    assert got_rec == want_rec and [r[0] for r in got_rec] == paths
    assert any((tmp_path / "marks").iterdir()) and sum(done_here) < len(paths)  # a child read some of them


def test_a_dead_child_leaves_its_chunks_to_the_parent(tmp_path, monkeypatch):
    paths = [str(p) for p in write_series(tmp_path / "big", n=40)]  # 3 chunks of >= 16 files
    one = Pseudonymizer(b"k" * 32)
    want = dicom.scan_headers(paths, one, workers=1)
    done_here = _spy_chunks(monkeypatch, tmp_path / "marks", die=True)
    monkeypatch.setattr(dicom, "_cpus", lambda: 2)
    forked = Pseudonymizer(b"k" * 32)
    got = dicom.scan_headers(paths, forked, workers=2)
    _same(tmp_path, one, want, forked, got)
    assert any((tmp_path / "marks").iterdir())  # a child did die mid-scan
    assert sum(done_here) == len(paths)  # every chunk read here in the end, the dead child's too
