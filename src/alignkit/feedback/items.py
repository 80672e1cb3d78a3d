"""Read the JSONL files that a labeling project is created from.

Two kinds, one item a line:

- ranking (from ``alignkit generate`` / ``alignkit label-ai``)::

      {"prompt": str | [{"role", "content"}, ...], "completions": [str, ...], "id"?: str, "meta"?: {...}}

  Keys other than these (``scores``, ``provenance``, ...) are kept in ``meta``.
- pairwise (from ``alignkit eval``, a human evaluation of two models)::

      {"prompt": ..., "response_a": str, "response_b": str, "model_a": str, "model_b": str, "id"?: str}

  A project compares exactly two models. Lines that name them the other way
  round are turned around, so that ``model_a`` means the same model on every item.

Every problem is a :class:`~alignkit.errors.DataError` naming file, line and field.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.errors import AlignkitError, DataError

KINDS = ("ranking", "pairwise")
MAX_COMPLETIONS = 9  # ranks are typed with the number keys 1-9
ROLES = ("system", "user", "assistant", "tool")
_RANKING_KEYS = {"prompt", "completions", "id", "meta"}
_PAIRWISE_KEYS = {"prompt", "response_a", "response_b", "model_a", "model_b", "id", "meta"}


@dataclass
class ItemSpec:
    """One item as the storage layer takes it; ``completions`` are in the file's order.

    For pairwise items ``completions`` is ``[response of model_a, response of model_b]``.
    """

    ext_id: str
    prompt: str | list[dict]
    completions: list[str]
    meta: dict = field(default_factory=dict)


@dataclass
class ProjectFile:
    kind: str
    items: list[ItemSpec]
    model_a: str | None = None
    model_b: str | None = None


def read_project_file(path: str | Path, kind: str) -> ProjectFile:
    from alignkit.data.io import check_file, text_lines

    path = Path(path)
    check_file(path, "project file")

    def lines():
        for lineno, text, problem in text_lines(path):
            if problem:
                raise DataError(str(path), f"line {lineno}", None, problem)
            yield text.rstrip("\r\n")

    return parse_project_lines(lines(), kind, source=str(path))


def parse_project_bytes(data: bytes, kind: str, source: str) -> ProjectFile:
    """A project file that arrived whole (an upload), read as :func:`read_project_file` reads one from disk.

    Lines end at "\n" only: ``str.splitlines`` would also break a line at U+2028, U+0085 or a form
    feed, which JSON allows inside a string, and number the lines differently from the file.
    """

    def lines():
        for lineno, raw in enumerate(data.split(b"\n"), 1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(source, f"line {lineno}", None,
                                f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}; "
                                f"save the file as UTF-8)") from None
            yield text.rstrip("\r")

    return parse_project_lines(lines(), kind, source)


def parse_project_lines(lines: Iterable[str], kind: str, source: str) -> ProjectFile:
    from alignkit.data.io import JSONProblem, check_values, parse_json

    if kind not in KINDS:
        raise AlignkitError(f"unknown project kind {kind!r}; use 'ranking' or 'pairwise'")
    out = ProjectFile(kind, [])
    seen_ids: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line)
        except JSONProblem as e:
            raise DataError(source, f"line {lineno}", None, e.problem) from None
        if not isinstance(row, dict):
            raise DataError(source, f"line {lineno}", None, "each line must be a JSON object")
        bad = check_values(row)  # text the database and the browser cannot take (a lone surrogate)
        if bad is not None:
            raise DataError(source, f"line {lineno}", *bad)
        where = (source, f"line {lineno}")
        item = _ranking_item(row, where) if kind == "ranking" else _pairwise_item(row, where, out)
        if item.ext_id == "":
            item.ext_id = f"line-{lineno}"
        if item.ext_id in seen_ids:
            raise DataError(source, f"line {lineno}", "id", f"duplicate id {item.ext_id!r} (first on line {seen_ids[item.ext_id]})")
        seen_ids[item.ext_id] = lineno
        out.items.append(item)
    if not out.items:
        raise DataError(source, None, None, "no items: the file is empty")
    return out


def _ranking_item(row: dict, where: tuple[str, str]) -> ItemSpec:
    prompt = _prompt(row, where)
    completions = row.get("completions")
    if not isinstance(completions, list):
        raise DataError(*where, "completions", "missing or not a list of strings")
    if not 2 <= len(completions) <= MAX_COMPLETIONS:
        raise DataError(*where, "completions", f"needs 2 to {MAX_COMPLETIONS} completions, got {len(completions)}")
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise DataError(*where, f"completions[{i}]", f"must be a string, got {type(c).__name__}")
    # Nobody can rank two copies of one text, and alignkit's ranking reader refuses them.
    seen: dict[str, int] = {}
    for i, c in enumerate(completions):
        if c.strip() in seen:
            raise DataError(*where, f"completions[{i}]", f"identical to completions[{seen[c.strip()]}]")
        seen[c.strip()] = i
    meta = _meta(row, where, _RANKING_KEYS)
    return ItemSpec(_ext_id(row, where), prompt, list(completions), meta)


def _pairwise_item(row: dict, where: tuple[str, str], project: ProjectFile) -> ItemSpec:
    prompt = _prompt(row, where)
    values = {}
    for key in ("response_a", "response_b", "model_a", "model_b"):
        v = row.get(key)
        if not isinstance(v, str):
            raise DataError(*where, key, "missing or not a string")
        values[key] = v
    for key in ("model_a", "model_b"):
        _no_nul(values[key], where, key)
    if not values["model_a"].strip() or values["model_a"] == values["model_b"]:
        raise DataError(*where, "model_b", "model_a and model_b must be two different, non-empty names")
    responses = [values["response_a"], values["response_b"]]
    if project.model_a is None:
        project.model_a, project.model_b = values["model_a"], values["model_b"]
    if (values["model_a"], values["model_b"]) == (project.model_b, project.model_a):
        responses.reverse()
    elif (values["model_a"], values["model_b"]) != (project.model_a, project.model_b):
        raise DataError(
            *where, "model_a",
            f"a pairwise project compares two models ({project.model_a!r} and {project.model_b!r}); "
            f"this line has {values['model_a']!r} and {values['model_b']!r}",
        )
    meta = _meta(row, where, _PAIRWISE_KEYS)
    return ItemSpec(_ext_id(row, where), prompt, responses, meta)


def _prompt(row: dict, where: tuple[str, str]) -> str | list[dict]:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(*where, "prompt", "is empty")
        return prompt
    if isinstance(prompt, list) and prompt:
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise DataError(*where, f"prompt[{i}]", f"a chat message needs a 'role' in {ROLES} and a string 'content'")
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise DataError(*where, "prompt", "missing, or neither a string nor a non-empty list of chat messages")


def _ext_id(row: dict, where: tuple[str, str]) -> str:
    v = row.get("id")
    if v is None:
        return ""
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        raise DataError(*where, "id", "must be a string or an integer")
    v = str(v)
    if len(v) > 200:
        raise DataError(*where, "id", "longer than 200 characters")
    _no_nul(v, where, "id")
    return v


def _no_nul(value: str, where: tuple[str, str], key: str) -> None:
    # Ids and model names are stored as text columns, and PostgreSQL's text cannot hold NUL:
    # refused here, naming the line, rather than as a driver error when the project is stored.
    if "\x00" in value:
        raise DataError(*where, key, "holds a NUL character (\\u0000)")


def _meta(row: dict, where: tuple[str, str], known: set[str]) -> dict:
    meta = row.get("meta", {})
    if not isinstance(meta, dict):
        raise DataError(*where, "meta", "must be a JSON object")
    meta = dict(meta)
    # label-ai writes "scores", "provenance", ...: unknown keys travel along in meta.
    for k, v in row.items():
        if k not in known:
            meta.setdefault(k, v)
    return meta
