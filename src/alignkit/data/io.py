"""Read raw records with their location, from files or ``datasets`` names.

Every record comes with a location string that error messages quote: the line
of a JSONL file, the row of a CSV (the header is row 1), the index of a JSON
list or a Parquet / hub dataset row.
"""

from __future__ import annotations

import csv
import io
import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.errors import AlignkitError, ConfigError, DataError

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

    Lines that are not valid JSON (or not UTF-8 text) come as records holding
    ``__invalid__`` (the caller raises or, with ``on_error=skip``, skips and counts
    them); a file that cannot be read at all (a folder, a file that is not what
    its name says) raises a located :class:`AlignkitError` right away.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in FILE_SUFFIXES or p.is_file():
        check_file(p)
        readers = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}
        if suffix not in readers:
            raise AlignkitError(f"{path}: unknown file type '{suffix}'; use .jsonl, .json, .csv or .parquet")
        try:
            yield from readers[suffix](p)
        except OSError as e:  # removed or unreadable while reading
            raise AlignkitError(f"{path}: cannot read ({e.strerror or e})") from None
        return
    yield from _hub(path, split)


def check_file(p: Path, what: str = "data file") -> None:
    """A regular file that can be opened, or an AlignkitError saying what it is instead."""
    if not p.exists():
        raise AlignkitError(f"{p}: cannot read {what} (no such file)")
    if p.is_dir():
        raise AlignkitError(f"{p}: cannot read {what} (it is a folder)")
    try:
        p.open("rb").close()
    except OSError as e:
        raise AlignkitError(f"{p}: cannot read {what} ({e.strerror or e})") from None


def text_lines(p: Path) -> Iterator[tuple[int, str | None, str]]:
    """``(line number, text, problem)`` for each line: text None and the problem when the
    line is not UTF-8 (a byte-order mark on line 1 is dropped)."""
    with p.open("rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                yield i, raw.decode("utf-8-sig" if i == 1 else "utf-8"), ""
            except UnicodeDecodeError as e:
                yield i, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}; save the file as UTF-8)"


def read_text(p: str | Path, what: str = "data file") -> str:
    """A whole file as text; bytes that are not UTF-8 are a DataError naming the line."""
    p = Path(p)
    check_file(p, what)
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        newline = b"\n"
        line, line_start = raw.count(newline, 0, e.start) + 1, raw.rfind(newline, 0, e.start) + 1
        problem = f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start - line_start + 1}; save the file as UTF-8)"
        raise DataError(str(p), f"line {line}", None, problem) from None


def read_yaml(p: str | Path, what: str = "config") -> Any:
    """A YAML file's data; unreadable, not UTF-8 or not YAML is a ConfigError naming the file."""
    import yaml

    try:
        text = read_text(p, what)
    except AlignkitError as e:
        raise ConfigError(str(e)) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None


def _jsonl(p: Path) -> Iterator[Record]:
    for i, line, problem in text_lines(p):
        if problem:
            yield Record(str(p), f"line {i}", {"__invalid__": problem})
            continue
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
        data = json.loads(read_text(p))
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
    # Decoded with surrogateescape so that a row with a stray byte is that row's problem
    # (skippable), not the file's; a cell may span lines, so rows are found by the csv module.
    text = p.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for i, row in enumerate(reader, 2):
        if None in row:
            yield Record(str(p), f"row {i}", {"__invalid__": "more cells than header columns"})
            continue
        bad = next((v for v in row.values() if v and _SURROGATE.search(v)), None)
        if bad is not None:
            byte = ord(_SURROGATE.search(bad).group()) - 0xDC00
            yield Record(str(p), f"row {i}", {"__invalid__": f"not UTF-8 text (byte 0x{byte:02x}; save the file "
                                                             f"as UTF-8)"})
            continue
        yield Record(str(p), f"row {i}", {k: _csv_value(v) for k, v in row.items()})


_SURROGATE = re.compile("[\udc80-\udcff]")


def _csv_value(v: str | None):
    # Cells holding JSON lists (chat messages, rankings) are decoded; text stays text.
    if v is not None and v[:1] in "[{":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def _parquet(p: Path) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(str(p), None, None, f"not a readable Parquet file ({str(e).splitlines()[0]})") from None
    for i, row in enumerate(rows):
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
    empty: list[str] = field(default_factory=list)  # valid records that give nothing (a ranking of ties)

    def handle(self, err: DataError) -> None:
        if self.mode == "raise":
            raise err
        self.skipped.append(err)

    def report(self, what: str) -> None:
        if self.skipped:
            msg = (f"skipped {len(self.skipped)} of {self.total} {what} (data.on_error=skip); "
                   f"first: {self.skipped[0]}")
            warnings.warn(DataWarning(msg), stacklevel=2)
        if self.empty:
            msg = (f"{len(self.empty)} of {self.total} {what} gave no pairs (every completion tied, or "
                   f"can't-rank); first: {self.empty[0]}")
            warnings.warn(DataWarning(msg), stacklevel=2)
