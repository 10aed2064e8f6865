"""Folds stratified by city: each city's share within one image per fold, seeded, read back."""

from __future__ import annotations

from collections import Counter

import pytest
from click.testing import CliRunner

from geopose_mlops.cli import main
from geopose_mlops.data.folds import make_folds, read_folds, write_folds
from geopose_mlops.errors import DataError


def _pairs(counts: dict[str, int]) -> list[tuple[str, str]]:
    return [(f"{city}_{i:03d}", city) for city, n in counts.items() for i in range(n)]


@pytest.mark.parametrize("k", [2, 3, 5])
def test_each_city_is_spread_within_one_image_per_fold(k) -> None:
    counts = {"ARG": 7, "ATL": 11, "JAX": 5, "OMA": 13}
    rows = make_folds(_pairs(counts), k=k, seed=1)
    assert sorted(r[0] for r in rows) == sorted(p[0] for p in _pairs(counts))
    for city, n in counts.items():
        per_fold = Counter(fold for _, c, fold in rows if c == city)
        sizes = [per_fold.get(f, 0) for f in range(k)]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
    totals = Counter(fold for _, _, fold in rows)
    assert max(totals.values()) - min(totals.values()) <= 1


def test_folds_are_seeded() -> None:
    pairs = _pairs({"ARG": 10, "OMA": 10})
    assert make_folds(pairs, 5, seed=0) == make_folds(list(reversed(pairs)), 5, seed=0)
    assert make_folds(pairs, 5, seed=0) != make_folds(pairs, 5, seed=1)


def test_bad_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot fill 5 folds"):
        make_folds(_pairs({"ARG": 3}), 5, 0)
    with pytest.raises(ValueError, match="more than once"):
        make_folds([("ARG_a", "ARG"), ("ARG_a", "ARG")], 2, 0)


def test_write_read_round_trip_and_clear_errors(tmp_path) -> None:
    rows = make_folds(_pairs({"JAX": 4, "ATL": 4}), 4, 0)
    path = tmp_path / "folds.csv"
    write_folds(path, rows)
    assert read_folds(path) == {sample_id: fold for sample_id, _, fold in rows}
    path.write_text("id,city,fold\nJAX_a,JAX,1\nJAX_b,JAX,two\n")
    with pytest.raises(DataError, match="line 3: fold 'two' is not an integer"):
        read_folds(path)
    with pytest.raises(DataError, match="not found"):
        read_folds(tmp_path / "none.csv")


def test_folds_command_writes_folds_csv_into_the_data_folder(synthetic_data, tmp_path) -> None:
    out = tmp_path / "f.csv"
    result = CliRunner().invoke(main, ["folds", str(synthetic_data), "--k", "2", "--seed", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    folds = read_folds(out)
    assert len(folds) == 8
    assert Counter(folds.values()) == {0: 4, 1: 4}
    assert all(Counter(f for s, f in folds.items() if s.startswith(c)) == {0: 1, 1: 1} for c in ("ARG", "OMA"))
