"""Read raw records with their location, from files or ``datasets`` names.

Every record comes with a location string that error messages quote: the line
of a JSONL file, the row of a CSV (the header is row 1), the index of a JSON
list or a Parquet / hub dataset row.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.errors import AlignkitError, ConfigError, DataError

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_DEPTH = 100  # lists/objects inside one record; far beyond any chat or ranking, well within Python's stack
CSV_FIELD_LIMIT = 2**31 - 1  # long cells are legitimate text (the csv module's default stops at 131,072)


@dataclass
class Record:
    source: str  # file name or dataset name
    location: str  # "line 12", "row 3", "item 0"
    data: dict

    def error(self, field: str | None, problem: str) -> DataError:
        if field is None and "__invalid__" in self.data:  # an unreadable record names its bad field
            field = self.data.get("__field__")
        return DataError(self.source, self.location, field, problem)


def invalid(problem: str, field: str | None = None) -> dict:
    """A record's data when it cannot be used: ``__invalid__`` holds the problem, ``__field__``
    the field it is in (when one is to blame)."""
    return {"__invalid__": problem} if field is None else {"__invalid__": problem, "__field__": field}


class JSONProblem(ValueError):
    """Text that is not usable JSON: ``problem`` for the message, ``line`` (1-based) when known."""

    def __init__(self, problem: str, line: int | None = None):
        super().__init__(problem)
        self.problem, self.line = problem, line


class RepeatedKeyProblem(JSONProblem):
    """JSON that parses, but with a key given twice in one object: a CSV cell holding it is not
    taken for text (as a cell that is not JSON at all is)."""


def parse_json(text: str) -> Any:
    """``json.loads`` whose every failure is a :class:`JSONProblem`: bad syntax, a key given twice in
    one object, nesting too deep for the parser (a RecursionError), or a value it refuses (an integer
    of over 4,300 digits)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except DuplicateKey as e:
        raise RepeatedKeyProblem(f"key '{_field_name(e.key)}' is given twice in one object (which one is meant?)") from None
    except json.JSONDecodeError as e:
        raise JSONProblem(f"invalid JSON ({e.msg} at column {e.colno})", e.lineno) from None
    except RecursionError:
        line = _deep_line(text)
        raise JSONProblem(f"invalid JSON (lists/objects nested more than {MAX_DEPTH} levels deep)", line) from None
    except ValueError as e:
        raise JSONProblem(f"invalid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


class DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    # json.loads keeps the last of two equal keys silently: {"chosen": "a", "chosen": "b"} would
    # train on "b" and drop "a" without a word, so a repeated key is the record's problem.
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return out


_JSON_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|[\[\]{}\n]')


def _deep_line(text: str) -> int | None:
    """The line where lists/objects first nest deeper than MAX_DEPTH (strings skipped)."""
    depth, line = 0, 1
    for m in _JSON_TOKEN.finditer(text):
        c = m.group()
        if c == "\n":
            line += 1
        elif c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return line
        elif c in "]}":
            depth -= 1
    return None


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def find_unusable(data: Any, max_depth: int | None = MAX_DEPTH) -> tuple[tuple, bool, str] | None:
    """``(path, is_key, problem)`` for the first value of JSON-like ``data`` that no later stage can
    use: a string (key or value, at any depth) that is not encodable text (a lone UTF-16 surrogate
    such as the JSON escape ``"\\ud800"``), or (``max_depth``) lists/objects nested deeper than that.
    ``path`` holds the keys and indices from the top (a bad key's ends with the key); None when every
    value is fine. Walks without recursion. The readers and the web apps share it.
    """
    stack: list[tuple[tuple, Any]] = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            bad = _LONE_SURROGATE.search(value)
            if bad:
                return path, False, _surrogate_problem(bad, "")
        elif isinstance(value, (dict, list, tuple)):
            if max_depth is not None and len(path) > max_depth:
                return path[:1], False, f"lists/objects nested more than {max_depth} levels deep"
            if isinstance(value, dict):
                for k in value:
                    bad = _LONE_SURROGATE.search(k) if isinstance(k, str) else None
                    if bad:
                        return path + (k,), True, _surrogate_problem(bad, "the key is ")
                items = [(path + (k,), v) for k, v in value.items()]
            else:
                items = [(path + (i,), v) for i, v in enumerate(value)]
            stack.extend(reversed(items))
    return None


def _surrogate_problem(bad: re.Match, what: str) -> str:
    return (f"{what}not valid text (a lone surrogate \\u{ord(bad.group()):04x} at character {bad.start() + 1}: "
            f"half of a UTF-16 pair, as a JSON \\u escape writes it; give the whole character)")


def check_values(data: Any) -> tuple[str | None, str] | None:
    """``(field, problem)`` for the first value of a record that no later stage can use
    (:func:`find_unusable`), the field written as ``messages[1].content``; None when all are fine."""
    found = find_unusable(data)
    if found is None:
        return None
    path, _, problem = found
    field = ""
    for part in path:
        field += f"[{part}]" if isinstance(part, int) else (f".{_field_name(part)}" if field else _field_name(part))
    return field or None, problem


def _field_name(key: Any) -> str:
    # shown in a message that goes to a terminal: escape what cannot be printed as UTF-8
    return str(key).encode("utf-8", "backslashreplace").decode("utf-8")


def checked(rec: Record) -> Record:
    """The record, or (a value that no later stage can use) the record made invalid, naming the field."""
    if "__invalid__" not in rec.data:
        bad = check_values(rec.data)
        if bad is not None:
            return Record(rec.source, rec.location, invalid(bad[1], bad[0]))
    return rec


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
            for rec in readers[suffix](p):
                yield checked(rec)
        except OSError as e:  # removed or unreadable while reading
            raise AlignkitError(f"{path}: cannot read ({e.strerror or e})") from None
        return
    for rec in _hub(path, split):
        yield checked(rec)


def first_parsed(records: Iterator[Record]) -> tuple[Record | None, Iterator[Record]]:
    """The first record that parses (what a file's format is detected from: an unreadable first
    line says nothing about it), and every record again, those before it included."""
    head: list[Record] = []
    for rec in records:
        head.append(rec)
        if "__invalid__" not in rec.data:
            return rec, itertools.chain(head, records)
    return None, iter(head)


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
        return yaml.load(text, Loader=_unique_key_loader())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: {yaml_problem(e)}") from None


def yaml_problem(e: Exception) -> str:
    """A YAML error on one line: ``invalid YAML at line L, column C: problem`` (PyYAML's own
    message spans several lines, quoting the text with a caret under it)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"invalid YAML{at}: {problem}"


@functools.cache
def _unique_key_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """safe_load, except that a key given twice in one mapping is an error: PyYAML would keep
        the last silently, so one of two settings (``model:`` written twice) would be ignored."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` merges on purpose
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: construct_mapping reports it
                    continue
                if repeated:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _jsonl(p: Path) -> Iterator[Record]:
    for i, line, problem in text_lines(p):
        if problem:
            yield Record(str(p), f"line {i}", {"__invalid__": problem})
            continue
        if not line.strip():
            continue
        try:
            row = parse_json(line)
        except JSONProblem as e:
            yield Record(str(p), f"line {i}", invalid(e.problem))
            continue
        if not isinstance(row, dict):
            yield Record(str(p), f"line {i}", {"__invalid__": "each line must be a JSON object"})
            continue
        yield Record(str(p), f"line {i}", row)


def _json(p: Path) -> Iterator[Record]:
    try:
        data = parse_json(read_text(p))
    except JSONProblem as e:
        raise DataError(str(p), f"line {e.line}" if e.line else None, None, e.problem) from None
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
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        reader.fieldnames  # the header: a file without one cannot be read at all
    except csv.Error as e:
        raise DataError(str(p), "row 1", None, f"not valid CSV ({e})") from None
    for i in itertools.count(2):
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # the reader starts afresh at the next row
            yield Record(str(p), f"row {i}", invalid(f"not valid CSV ({e})"))
            continue
        if None in row:
            yield Record(str(p), f"row {i}", {"__invalid__": "more cells than header columns"})
            continue
        bad = next((v for v in row.values() if v and _SURROGATE.search(v)), None)
        if bad is not None:
            byte = ord(_SURROGATE.search(bad).group()) - 0xDC00
            yield Record(str(p), f"row {i}", {"__invalid__": f"not UTF-8 text (byte 0x{byte:02x}; save the file "
                                                             f"as UTF-8)"})
            continue
        try:
            values = {k: _csv_value(v) for k, v in row.items()}
        except RepeatedKeyProblem as e:
            column = next(k for k, v in row.items() if _repeats_a_key(v))
            yield Record(str(p), f"row {i}", invalid(e.problem, _field_name(column)))
            continue
        yield Record(str(p), f"row {i}", values)


_SURROGATE = re.compile("[\udc80-\udcff]")


def _csv_value(v: str | None):
    # Cells holding JSON lists (chat messages, rankings) are decoded; text stays text.
    if v is not None and v[:1] in "[{":
        try:
            return parse_json(v)
        except RepeatedKeyProblem:
            raise
        except JSONProblem:
            return v
    return v


def _repeats_a_key(v: str | None) -> bool:
    try:
        _csv_value(v)
    except RepeatedKeyProblem:
        return True
    return False


def _parquet(p: Path) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(str(p), None, None, f"not a readable Parquet file ({str(e).splitlines()[0]})") from None
    try:
        rows = table.to_pylist()
    except UnicodeDecodeError:  # a string column holding bytes that are not UTF-8: that row's problem
        rows = None
    if rows is not None:
        for i, row in enumerate(rows):
            yield Record(str(p), f"row {i}", row)
        return
    columns = table.column_names
    for i in range(table.num_rows):
        row = {}
        for name in columns:
            try:
                row[name] = table.column(name)[i].as_py()
            except UnicodeDecodeError as e:
                row = invalid(f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at position {e.start + 1}; "
                              f"write the column as UTF-8)", _field_name(name))
                break
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
