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
    paths = [str(p) for p in write_series(tmp_path / "a", n=6) + write_series(tmp_path / "b", n=5, modality="MR")]
    (tmp_path / "junk").write_bytes(b"not dicom at all")
    return [*paths, str(tmp_path / "junk")]


def _same(tmp_path, want_pseudo, want, got_pseudo, got):
    assert [h.to_dict() for h in got] == [h.to_dict() for h in want]
    want_pseudo.write_map(tmp_path / "want.csv")
    got_pseudo.write_map(tmp_path / "got.csv")
    assert (tmp_path / "got.csv").read_text() == (tmp_path / "want.csv").read_text()


@pytest.mark.parametrize("workers", [2, 3])
def test_forked_scan_matches_one_process_with_records(tmp_path, monkeypatch, workers):
    paths = _paths(tmp_path)
    one = Pseudonymizer(b"k" * 32)
    want, want_rec = dicom.scan_headers_records(paths, one, workers=1, record=lambda h: (h.path, h.instance_number))
    monkeypatch.setattr(dicom, "_PROCESS_MIN_FILES", 1)
    monkeypatch.setattr(dicom, "_cpus", lambda: workers)
    forked = Pseudonymizer(b"k" * 32)
    got, got_rec = dicom.scan_headers_records(
        paths, forked, workers=workers, record=lambda h: (h.path, h.instance_number)
    )
    _same(tmp_path, one, want, forked, got)
    assert got_rec == want_rec and [r[0] for r in got_rec] == paths


def test_a_dead_child_leaves_its_chunks_to_the_parent(tmp_path, monkeypatch):
    paths = [str(p) for p in write_series(tmp_path / "big", n=40)]  # 3 chunks of >= 16 files
    one = Pseudonymizer(b"k" * 32)
    want = dicom.scan_headers(paths, one, workers=1)
    parent, real, done_here = os.getpid(), dicom._scan_chunk, []

    def dying(chunk, pseudo, record):
        if os.getpid() != parent:
            os._exit(3)  # killed mid-scan (OOM killer, a signal): no results come back
        if not done_here:
            time.sleep(0.3)  # the child takes the other chunks meanwhile
        done_here.append(len(chunk))
        return real(chunk, pseudo, record)

    monkeypatch.setattr(dicom, "_PROCESS_MIN_FILES", 1)
    monkeypatch.setattr(dicom, "_cpus", lambda: 2)
    monkeypatch.setattr(dicom, "_scan_chunk", dying)
    forked = Pseudonymizer(b"k" * 32)
    got = dicom.scan_headers(paths, forked, workers=2)
    _same(tmp_path, one, want, forked, got)
    assert sum(done_here) == len(paths)  # every chunk read here in the end, the dead child's too
