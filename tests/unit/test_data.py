"""CSV loading and scoring: the pure half of the model pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from forecaster.data import cut_index, load_csv, parse_time, score
from forecaster.errors import DataError

WATER = Path(__file__).resolve().parents[2] / "data" / "water-flow.csv"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "d.csv"
    p.write_text(text)
    return p


def test_iso_offsets_and_epoch_seconds_agree() -> None:
    assert parse_time("2022-03-20T11:00:00+01:00") == 1647770400.0
    assert parse_time("2022-03-20T10:00:00Z") == 1647770400.0
    assert parse_time("2022-03-20T10:00:00") == 1647770400.0  # naive = UTC
    assert parse_time("1647770400") == 1647770400.0


@pytest.mark.parametrize("text", ["19580329", "1700", "0", "1714557600000"])
def test_ambiguous_numbers_are_refused_not_read_as_epoch(text: str) -> None:
    """A YYYYMMDD date, a year, a row number or milliseconds: no guess, a pointer to the flag."""
    with pytest.raises(ValueError, match="--time-format"):
        parse_time(text)


@pytest.mark.parametrize(
    ("text", "fmt", "expected"),
    [
        # Expected values from `date -u -d ... +%s`, not from the code under test.
        ("19580329", "%Y%m%d", -371174400.0),
        ("1700", "%Y", -8520336000.0),
        ("05/20/1987", "%m/%d/%Y", 548467200.0),
        ("Jan-1-1995", "%b-%d-%Y", 788918400.0),
        ("1995-01-01 06:00 +0100", "%Y-%m-%d %H:%M %z", 788936400.0),
        ("3", "epoch", 3.0),
        ("2022-03-20T10:00:00Z", "iso", 1647770400.0),
    ],
)
def test_explicit_time_formats(text: str, fmt: str, expected: float) -> None:
    assert parse_time(text, fmt) == expected


def test_common_forms_need_a_format() -> None:
    for text in ("05/20/1987", "Jan-1-1995"):
        with pytest.raises(ValueError, match="--time-format"):
            parse_time(text)
    with pytest.raises(ValueError, match="does not match"):
        parse_time("1987-05-20", "%m/%d/%Y")
    with pytest.raises(ValueError, match="not ISO"):
        parse_time("1647770400", "iso")


def test_an_ambiguous_time_column_names_its_row(tmp_path: Path) -> None:
    p = write(tmp_path, "t,v\n19580329,1\n19580330,2\n")
    with pytest.raises(DataError, match=r"row 0 time column 't'.*--time-format"):
        load_csv(p, time_column="t")
    (s,) = load_csv(p, time_column="t", time_format="%Y%m%d").series
    assert np.diff(s.times).tolist() == [86400.0]


def test_water_flow_loads_in_time_order() -> None:
    d = load_csv(WATER, time_column="Time")
    (s,) = d.series
    assert len(s) == 1268
    assert s.times is not None and np.all(np.diff(s.times) > 0)
    assert s.values[0] == pytest.approx(100.59)
    assert len(d.sha256) == 64
    assert s.segments() == [(0, 1268)]


def test_missing_values_split_the_series(tmp_path: Path) -> None:
    p = write(tmp_path, "t,v\n0,1\n1,2\n2,\n3,NaN\n4,5\n5,6\n6,7\n")
    (s,) = load_csv(p, time_column="t", time_format="epoch").series
    assert s.segments() == [(0, 2), (4, 7)]


def test_several_columns_are_several_series(tmp_path: Path) -> None:
    p = write(tmp_path, "a,b\n1,10\n2,20\n3,30\n")
    d = load_csv(p, columns=["a", "b"])
    assert [s.name for s in d.series] == ["a", "b"]
    assert d.series[1].values.tolist() == [10, 20, 30]


def test_long_format_groups_by_stream(tmp_path: Path) -> None:
    p = write(tmp_path, "ts,id,v\n3,x,3\n1,x,1\n1,y,10\n2,y,20\n2,x,2\n")
    d = load_csv(p, columns=["v"], time_column="ts", stream_column="id", time_format="epoch")
    by = {s.name: s for s in d.series}
    assert by["x"].values.tolist() == [1, 2, 3]  # sorted by time
    assert by["y"].rows.tolist() == [2, 3]


def test_no_header_names_columns_by_position() -> None:
    p = WATER.parent / "electric-devices.csv"
    d = load_csv(p, columns=["1"], header=False)
    assert len(d.series[0]) == 11532


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("a,b\n1,2\n", {"columns": ["zzz"]}, "column 'zzz' not found"),
        ("a,b\n1,x\n", {"columns": ["b"]}, "'x' is not a number"),
        ("a,b\n1,2\n", {}, "--column"),
        ("t,v\nnot-a-time,1\n", {"time_column": "t"}, "time column"),
        ("a\n", {}, "no data rows"),
    ],
)
def test_bad_data_is_a_data_error(tmp_path: Path, text: str, kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_csv(write(tmp_path, text), **kwargs)


def test_missing_file() -> None:
    with pytest.raises(DataError, match="no such file"):
        load_csv("/nonexistent/x.csv")


def test_cut_index_by_row_and_time() -> None:
    (s,) = load_csv(WATER, time_column="Time").series
    assert cut_index(s, "1014") == 1014
    assert cut_index(s, s.rows.size and "2022-03-20T12:00:00+01:00") == 1
    with pytest.raises(DataError):
        cut_index(s, "yesterday")


def test_score_against_hand_computed_values() -> None:
    actual = np.array([1.0, 2.0, 4.0])
    pred = np.array([1.5, 2.0, 3.0])
    naive = np.array([0.0, 1.0, 2.0])
    sc = score(actual, pred, naive, scale_diffs=[1.0, -1.0])
    assert sc.rmse == pytest.approx(np.sqrt((0.25 + 0 + 1) / 3))
    assert sc.mae == pytest.approx(0.5)
    assert sc.naive_rmse == pytest.approx(np.sqrt((1 + 1 + 4) / 3))
    assert sc.mase == pytest.approx(0.5 / 1.0)
    assert sc.n == 3


@pytest.mark.parametrize(("until", "noted"), [("50", False), ("100", True), ("99999", True)])
def test_an_until_past_the_end_is_said(tmp_path: Path, until: str, noted: bool) -> None:
    from forecaster.training.config import TrainConfig
    from forecaster.training.tape import split

    path = tmp_path / "d.csv"
    path.write_text("v\n" + "".join(f"{i % 7}\n" for i in range(100)))
    said: list[str] = []
    series, _ = split(load_csv(path, ["v"]), TrainConfig(until=until), said.append)
    assert len(series[0]) == (50 if until == "50" else 100)
    assert bool(said) == noted, said
    assert all(f"--until {until} is at or past the end" in line for line in said)
