"""Read raw records with their location, from files or ``datasets`` names.

Every record comes with a location string that error messages quote: the line
of a JSONL file, the row of a CSV (the header is row 1), the index of a JSON
list or a Parquet / hub dataset row.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.errors import AlignkitError, DataError

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Record:
    source: str  # file name or dataset name
    location: str  # "line 12", "row 3", "item 0"
    data: dict

    def error(self, field: str | None, problem: str) -> DataError:
        return DataError(self.source, self.location, field, problem)


def read_records(path: str, split: str = "train") -> Iterator[Record]:
    """Yield :class:`Record` objects from a file or a ``datasets.load_dataset`` name.

    Lines that are not valid JSON raise :class:`DataError` right away (they have
    no fields to check); the caller decides what to do with invalid fields.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in FILE_SUFFIXES or p.is_file():
        if not p.exists():
            raise AlignkitError(f"{path}: no such file")
        if suffix == ".jsonl":
            yield from _jsonl(p)
        elif suffix == ".json":
            yield from _json(p)
        elif suffix == ".csv":
            yield from _csv(p)
        elif suffix == ".parquet":
            yield from _parquet(p)
        else:
            raise AlignkitError(f"{path}: unknown file type '{suffix}'; use .jsonl, .json, .csv or .parquet")
        return
    yield from _hub(path, split)


def _jsonl(p: Path) -> Iterator[Record]:
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield Record(str(p), f"line {i}", {"__invalid__": f"invalid JSON ({e.msg} at column {e.colno})"})
                continue
            if not isinstance(row, dict):
                yield Record(str(p), f"line {i}", {"__invalid__": "each line must be a JSON object"})
                continue
            yield Record(str(p), f"line {i}", row)


def _json(p: Path) -> Iterator[Record]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(str(p), f"line {e.lineno}", None, f"invalid JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(str(p), None, None, "a .json file must hold a list of records (or {\"data\": [...]})")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            yield Record(str(p), f"item {i}", {"__invalid__": "each item must be a JSON object"})
        else:
            yield Record(str(p), f"item {i}", row)


def _csv(p: Path) -> Iterator[Record]:
    with p.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for i, row in enumerate(reader, 2):
            if None in row:
                yield Record(str(p), f"row {i}", {"__invalid__": "more cells than header columns"})
                continue
            yield Record(str(p), f"row {i}", {k: _csv_value(v) for k, v in row.items()})


def _csv_value(v: str | None):
    # Cells holding JSON lists (chat messages, rankings) are decoded; text stays text.
    if v is not None and v[:1] in "[{":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def _parquet(p: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    table = pq.read_table(p)
    for i, row in enumerate(table.to_pylist()):
        yield Record(str(p), f"row {i}", row)


def _hub(name: str, split: str) -> Iterator[Record]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types for "not found / offline"
        raise AlignkitError(f"cannot load dataset '{name}' (split {split}): {str(e).splitlines()[0]}") from None
    for i, row in enumerate(ds):
        yield Record(name, f"row {i}", dict(row))


class DataWarning(UserWarning):
    """Bad records were skipped under ``data.on_error=skip``."""


@dataclass
class ErrorPolicy:
    """``on_error=raise`` stops at the first bad record; ``skip`` counts and warns."""

    mode: str = "raise"
    skipped: list[DataError] = field(default_factory=list)
    total: int = 0

    def handle(self, err: DataError) -> None:
        if self.mode == "raise":
            raise err
        self.skipped.append(err)

    def report(self, what: str) -> None:
        if self.skipped:
            msg = (f"skipped {len(self.skipped)} of {self.total} {what} (data.on_error=skip); "
                   f"first: {self.skipped[0]}")
            warnings.warn(DataWarning(msg), stacklevel=2)
