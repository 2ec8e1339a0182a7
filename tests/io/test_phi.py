"""medxfer.io.phi: key handling, pseudonym format and stability, the local map, the PHI scanner."""

from __future__ import annotations

import re
import stat

import pandas as pd
import pytest
from medxfer.core.errors import MedxferError
from medxfer.io.phi import KEY_ENV, Pseudonymizer, load_key, scan_for_phi


def test_key_file_created_once_owner_only(tmp_path):
    kf = tmp_path / "ws" / ".pseudonym_key"
    k1 = load_key(kf)
    assert stat.S_IMODE(kf.stat().st_mode) == 0o600
    assert load_key(kf) == k1 and len(k1) >= 32


def test_env_key_wins_and_loose_key_file_is_refused(tmp_path, monkeypatch):
    kf = tmp_path / ".pseudonym_key"
    file_key = load_key(kf)
    monkeypatch.setenv(KEY_ENV, "an-operator-supplied-secret")
    assert load_key(kf) == b"an-operator-supplied-secret" != file_key
    monkeypatch.delenv(KEY_ENV)
    kf.chmod(0o644)
    with pytest.raises(MedxferError, match="chmod 600"):
        load_key(kf)


def test_pseudonym_format_stability_and_domain_separation():
    a, b = Pseudonymizer(b"a" * 32), Pseudonymizer(b"b" * 32)
    st, pt = a.study_key("1.2.3"), a.patient_key("1.2.3")
    assert re.fullmatch(r"st-[0-9a-f]{20}", st) and re.fullmatch(r"pt-[0-9a-f]{20}", pt)
    assert st[3:] != pt[3:]  # same string, different kind -> unrelated digests
    assert a.study_key(" 1.2.3 ") == st  # surrounding whitespace is not identity
    assert b.study_key("1.2.3") != st and a.fingerprint != b.fingerprint
    assert Pseudonymizer(b"a" * 32).study_key("1.2.3") == st


def test_map_is_local_merged_and_owner_only(tmp_path):
    p = Pseudonymizer(b"k" * 32)
    s1 = p.study_key("UID-1")
    m = tmp_path / "pseudonym_map.csv"
    p.write_map(m)
    q = Pseudonymizer(b"k" * 32)
    s2 = q.patient_key("PID-2")
    assert q.write_map(m) == 2
    df = pd.read_csv(m)
    assert dict(zip(df.pseudonym, df.original, strict=True)) == {s1: "UID-1", s2: "PID-2"}
    assert stat.S_IMODE(m.stat().st_mode) == 0o600
    e = Pseudonymizer.ephemeral()
    e.study_key("x")
    assert e.write_map(tmp_path / "other.csv") == 0


def test_scan_for_phi_text_folders_parquet_and_name_forms(tmp_path):
    (tmp_path / "log.txt").write_text("ok\npatient DOE JANE seen\n")
    pd.DataFrame({"who": ["x", "MRN-00123"] * 50}).to_parquet(tmp_path / "t.parquet", compression="snappy")
    (tmp_path / "clean.json").write_text("{}")
    hits = scan_for_phi(tmp_path, ["DOE^JANE", "mrn-00123", "NOT-THERE"])
    where = {h.where.split(":")[0].rsplit("/", 1)[-1] for h in hits}
    assert where == {"log.txt", "t.parquet"}
    assert scan_for_phi("line one\nsecret DOE^JANE", ["doe^jane"])
    assert not scan_for_phi(tmp_path, ["DOE^JANE"], exclude=[tmp_path / "log.txt"])


def test_a_reader_arriving_mid_write_sees_no_partial_key(tmp_path, monkeypatch):
    """The interleaving that broke concurrent ingests, made deterministic: a second stage loads the key while the
    first is still writing it. Before, it found the file already there, empty: "pseudonym key file is too short"."""
    import os

    kf = tmp_path / ".pseudonym_key"
    real_fdopen, seen = os.fdopen, []

    class Interrupted:
        def __init__(self, fh):
            self._fh = fh

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def __enter__(self):
            self._fh.__enter__()
            return self

        def __exit__(self, *exc):
            return self._fh.__exit__(*exc)

        def write(self, data):
            if not seen:
                seen.append(None)  # the other stage's own write is not interrupted again
                seen[0] = load_key(kf)  # the other stage, between the writer's open and its write
            return self._fh.write(data)

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: Interrupted(real_fdopen(*a, **k)))
    first = load_key(kf)
    assert seen == [first] and kf.read_bytes() == first + b"\n"  # one key won, and both stages use it


def _load(kf):
    return load_key(kf)


def test_racing_processes_agree_on_one_whole_key(tmp_path):
    """Two ingests creating the key at once: one read it before the other had written it ("too short")."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(6) as pool:
        for i in range(8):
            kf = tmp_path / f"ws{i}" / ".pseudonym_key"
            keys = pool.map(_load, [kf] * 12)
            assert len(set(keys)) == 1 and len(keys[0]) == 64
            assert kf.read_bytes() == keys[0] + b"\n" and stat.S_IMODE(kf.stat().st_mode) == 0o600
            assert [p.name for p in kf.parent.iterdir()] == [".pseudonym_key"]  # no temp file left behind
