"""The write-ahead journal's file format: round trips, rotation, and damage of every kind.

A damaged journal must behave like a damaged snapshot: refused from the damaged record on, with
a reason, never an exception. The truncation test cuts a journal at every byte offset (what a
crash in the middle of a ``write()`` can leave) and checks that exactly the whole records before
the cut come back.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forecaster.serve.codec import Prediction, Reading
from forecaster.serve.journal import (
    KIND_FORGET,
    KIND_WAVE,
    Journal,
    JournalDecodeError,
    WaveColumns,
    decode_forget,
    decode_wave,
    encode_forget,
    encode_wave,
    journal_prev_path,
    scan_journal,
)

SHA = "c" * 64


def reading(stream: str, ts: float, value: float, label: float | None = None) -> Reading:
    return Reading(stream, value, ts, ts, stream, label)


def wave(k: int, n: int = 3) -> tuple[list[Reading], list[Prediction | None]]:
    rs = [reading(f"s{i}", 100.0 * k + i, k + i / 10) for i in range(n)]
    ps: list[Prediction | None] = [
        None if i == 1 else Prediction(r.stream, r.ts, r.value * 2, i == 0)
        for i, r in enumerate(rs)
    ]
    return rs, ps


def write(path: Path, batches: int, base: int = 0) -> Journal:
    j = Journal(path, SHA, base, fsync=False)
    for k in range(batches):
        j.append(KIND_WAVE, encode_wave(*wave(k)))
    return j


# ------------------------------------------------------------------ payloads


streams = st.text(min_size=1, max_size=12) | st.sampled_from(["a/b", "ü/流", "x\ud800y"])
finite = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=200)
@given(
    rows=st.lists(
        st.tuples(
            streams,
            finite,
            finite,
            st.none() | st.sampled_from([0.0, 1.0]),
            st.none() | st.tuples(finite, st.booleans()),
        ),
        max_size=20,
    )
)
def test_wave_round_trip(rows: list) -> None:
    rs = [Reading(s, v, t, t, s, label) for s, t, v, label, _ in rows]
    ps = [None if p is None else Prediction(s, t, p[0], p[1]) for (s, t, _v, _l, p) in rows]
    back = decode_wave(encode_wave(rs, ps))
    assert [(r.stream, r.ts, r.value, r.label) for r in back.readings] == [
        (r.stream, r.ts, r.value, r.label) for r in rs
    ]
    assert [None if p is None else (p.stream, p.ts, p.value, p.warm) for p in back.predictions] == [
        None if p is None else (p.stream, p.ts, p.value, p.warm) for p in ps
    ]


@settings(max_examples=200)
@given(
    rows=st.lists(
        st.tuples(streams, finite, finite, st.none() | st.sampled_from([0.0, 1.0]), finite),
        max_size=20,
    ),
    warm=st.lists(st.booleans(), min_size=20, max_size=20),
)
def test_wave_from_the_engine_s_columns_is_the_same_record(rows: list, warm: list) -> None:
    """Every reading predicted: the columns the engine hands over (labels included) pack to
    the very bytes the reading and prediction objects do."""
    rs = [Reading(s, v, t, t, s, label) for s, t, v, label, _ in rows]
    ps: list[Prediction | None] = [
        Prediction(s, t, p, w) for (s, t, _v, _l, p), w in zip(rows, warm, strict=False)
    ]
    columns = WaveColumns(
        [r.stream for r in rs],
        np.array([r.ts for r in rs], dtype=np.float64),
        np.array([r.value for r in rs], dtype=np.float64),
        np.array([p.value for p in ps if p is not None], dtype=np.float64),
        np.array(warm[: len(rs)], dtype=bool),
        None if all(r.label is None for r in rs) else [r.label for r in rs],
    )
    assert encode_wave(rs, ps, columns) == encode_wave(rs, ps)


def test_wave_columns_must_match_the_readings() -> None:
    rs, ps = wave(0)
    few = WaveColumns(["s0"], np.zeros(1), np.zeros(1), np.zeros(1), np.zeros(1, dtype=bool))
    with pytest.raises(ValueError, match="columns for 1"):
        encode_wave(rs, ps, few)


@settings(max_examples=100)
@given(ids=st.lists(streams, max_size=20))
def test_forget_round_trip(ids: list[str]) -> None:
    assert decode_forget(encode_forget(ids)) == ids


@settings(max_examples=300)
@given(payload=st.binary(max_size=200))
def test_decoders_raise_only_their_error(payload: bytes) -> None:
    for decoder in (decode_wave, decode_forget):
        try:
            decoder(payload)
        except JournalDecodeError:
            pass


def test_wave_needs_aligned_predictions() -> None:
    rs, ps = wave(0)
    with pytest.raises(ValueError, match="predictions"):
        encode_wave(rs, ps[:-1])


# ------------------------------------------------------------------ files


def test_scan_returns_records_after_position(tmp_path: Path) -> None:
    path = tmp_path / "r.journal"
    j = write(path, 5)
    assert j.last_seq == 5
    scan = scan_journal(path, SHA, after=0)
    assert [seq for seq, _, _ in scan.records] == [1, 2, 3, 4, 5]
    assert scan.refused == []
    assert decode_wave(scan.records[2][2]).readings == wave(2)[0]
    assert [seq for seq, _, _ in scan_journal(path, SHA, after=3).records] == [4, 5]
    assert scan_journal(path, SHA, after=5).records == []
    j.append(KIND_FORGET, encode_forget(["s0"]))
    last = scan_journal(path, SHA, after=5).records
    assert [(seq, kind) for seq, kind, _ in last] == [(6, KIND_FORGET)]
    j.close()


def test_rotation_keeps_one_previous_segment(tmp_path: Path) -> None:
    path = tmp_path / "r.journal"
    j = write(path, 3)
    j.rotate()  # a snapshot at seq 3 was taken
    for k in range(3, 5):
        j.append(KIND_WAVE, encode_wave(*wave(k)))
    assert journal_prev_path(path).exists()
    # falling back to a snapshot older than the rotation still finds every record after it
    assert [s for s, _, _ in scan_journal(path, SHA, after=1).records] == [2, 3, 4, 5]
    assert [s for s, _, _ in scan_journal(path, SHA, after=3).records] == [4, 5]
    j.rotate()
    j.rotate()  # two rotations: the records of the first segment are gone
    scan = scan_journal(path, SHA, after=1)
    assert scan.records == [] and [r for r, _ in scan.refused] == ["gap"]
    j.close()


def test_every_truncation_gives_the_whole_records_before_it(tmp_path: Path) -> None:
    path = tmp_path / "r.journal"
    write(path, 4).close()
    blob = path.read_bytes()
    full = scan_journal(path, SHA, after=0).records
    ends: list[int] = []  # byte offset where each record ends
    pos = len(blob)
    for _, _, payload in reversed(full):
        ends.insert(0, pos)
        pos -= len(payload) + 17
    header_end = pos
    for cut in range(len(blob) + 1):
        path.write_bytes(blob[:cut])
        scan = scan_journal(path, SHA, after=0)
        whole = sum(1 for e in ends if e <= cut)
        assert [s for s, _, _ in scan.records] == list(range(1, whole + 1)), cut
        if cut in ends or cut == header_end:
            assert scan.refused == [], cut
        else:
            assert [r for r, _ in scan.refused] == ["torn"], cut


def test_bit_flips_are_refused_as_corrupt_from_that_record(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "r.journal"
    write(path, 6).close()
    pristine = path.read_bytes()
    good = scan_journal(path, SHA, after=0).records
    rng = random.Random(seed)
    for _ in range(20):
        blob = bytearray(pristine)
        at = rng.randrange(len(blob))
        blob[at] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(blob))
        scan = scan_journal(path, SHA, after=0)
        where = f"seed={seed} byte={at}"
        # whatever was hit (header, record header, payload), the records returned are sound
        # ones, in order, and the rest is refused with a reason
        assert scan.records == good[: len(scan.records)], where
        assert len(scan.records) < len(good), where  # a flipped bit never goes unnoticed
        assert len(scan.refused) == 1, where
        assert scan.refused[0][0] in ("torn", "corrupt", "gap", "foreign"), where


def test_foreign_and_garbage_segments(tmp_path: Path) -> None:
    path = tmp_path / "r.journal"
    write(path, 2).close()
    scan = scan_journal(path, "d" * 64, after=0)
    assert scan.records == [] and [r for r, _ in scan.refused] == ["foreign"]
    path.write_bytes(os.urandom(300))
    assert [r for r, _ in scan_journal(path, SHA, after=0).refused] == ["corrupt"]
    path.write_bytes(b"")
    assert [r for r, _ in scan_journal(path, SHA, after=0).refused] == ["torn"]
    path.unlink()
    path.mkdir()  # a directory where the file should be: unreadable, not a crash
    assert [r for r, _ in scan_journal(path, SHA, after=0).refused] == ["corrupt"]


def test_missing_journal_is_empty(tmp_path: Path) -> None:
    scan = scan_journal(tmp_path / "none.journal", SHA, after=0)
    assert scan.records == [] and scan.refused == []


def test_state_ahead_of_journal_start_is_a_gap(tmp_path: Path) -> None:
    path = tmp_path / "r.journal"
    write(path, 2, base=10).close()  # records 11, 12
    assert [s for s, _, _ in scan_journal(path, SHA, after=10).records] == [11, 12]
    scan = scan_journal(path, SHA, after=5)  # the state is older than the journal's start
    assert scan.records == [] and [r for r, _ in scan.refused] == ["gap"]


def test_fsync_mode_writes_the_same_records(tmp_path: Path) -> None:
    a, b = tmp_path / "a.journal", tmp_path / "b.journal"
    ja, jb = Journal(a, SHA, 0, fsync=False), Journal(b, SHA, 0, fsync=True)
    for k in range(3):
        ja.append(KIND_WAVE, encode_wave(*wave(k)))
        jb.append(KIND_WAVE, encode_wave(*wave(k)))
    ja.close()
    jb.close()
    assert scan_journal(a, SHA, 0).records == scan_journal(b, SHA, 0).records
    assert ja.size == a.stat().st_size and jb.size == b.stat().st_size


def test_append_after_close_raises_oserror(tmp_path: Path) -> None:
    j = write(tmp_path / "r.journal", 1)
    j.close()
    with pytest.raises(OSError):
        j.append(KIND_WAVE, encode_wave(*wave(1)))
    assert j.last_seq == 1


def test_record_overhead_is_small(tmp_path: Path) -> None:
    """Bytes per reading in a wave record (for the size bound in docs/reliability.md)."""
    j = Journal(tmp_path / "r.journal", SHA, 0, fsync=False)
    before = j.size
    rs = [reading(f"sensors/pump-{i}/flow", 1.6e9 + i, 1.0) for i in range(256)]
    j.append(KIND_WAVE, encode_wave(rs, [Prediction(r.stream, r.ts, 1.0, True) for r in rs]))
    per = (j.size - before) / len(rs)
    ids = sum(len(r.stream) for r in rs) / len(rs)
    assert math.isclose(per - ids, 37, abs_tol=0.5)  # 4 × 8 bytes + flags + id length
    j.close()


def test_failed_append_leaves_a_readable_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short write (disk full) is cut back, so the records after it still replay."""
    import forecaster.serve.journal as journal_module

    path = tmp_path / "r.journal"
    j = write(path, 2)
    real_write = os.write
    monkeypatch.setattr(journal_module.os, "write", lambda fd, data: real_write(fd, data[:10]))
    with pytest.raises(OSError, match="short journal write"):
        j.append(KIND_WAVE, encode_wave(*wave(2)))
    monkeypatch.setattr(journal_module.os, "write", real_write)
    assert j.last_seq == 2 and j.size == path.stat().st_size
    j.append(KIND_WAVE, encode_wave(*wave(3)))
    scan = scan_journal(path, SHA, after=0)
    assert [s for s, _, _ in scan.records] == [1, 2, 3] and scan.refused == []
    assert decode_wave(scan.records[2][2]).readings == wave(3)[0]
    j.close()
