"""Judge prompt templates: text files with a small YAML header.

A template is a ``.txt`` file::

    ---
    kind: scalar            # scalar (one score per response) or pairwise (A vs B)
    min: 1.00               # scalar: the score range the rubric asks for
    max: 5.00
    system: ...             # optional system message
    guidelines: ...         # pairwise: the default text for {guidelines}
    options: ["(A)", "(B)"] # pairwise: the answer strings (log-probability mode reads these)
    answer_prefix: ""       # text the answer starts with, before the option (log-probability mode)
    ---
    The user message, with {prompt}, {response} (scalar) or
    {response_a}, {response_b}, {guidelines} (pairwise).

Only ``{name}`` with a known name is a placeholder; write ``{{`` and ``}}`` for
literal braces. Shipped templates live beside this module (``quality``,
``toxicity``, ``pairwise``, ``constitution``); any other value is read as a path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from alignkit.config import build
from alignkit.errors import AlignkitError

KINDS = ("scalar", "pairwise")
PLACEHOLDERS = {
    "scalar": {"prompt", "response"},
    "pairwise": {"prompt", "response_a", "response_b", "guidelines"},
}
REQUIRED = {"scalar": {"response"}, "pairwise": {"response_a", "response_b"}}
_TOKEN = re.compile(r"\{\{|\}\}|\{(\w+)\}")
_HEADER_KEYS = {"kind", "min", "max", "system", "guidelines", "options", "answer_prefix", "description"}


@dataclass
class _Scale:
    """A scalar template's score range, read through :func:`alignkit.config.build` (finite numbers)."""

    min: float
    max: float


@dataclass(frozen=True)
class Template:
    name: str
    source: str  # where it was read from, for error messages
    text: str  # the whole file: part of every cache key, so an edited template never hits old verdicts
    kind: str
    body: str
    low: float | None = None
    high: float | None = None
    system: str | None = None
    guidelines: str = ""
    options: tuple[str, str] = ("(A)", "(B)")
    answer_prefix: str = ""
    description: str = ""
    meta: dict = field(default_factory=dict, compare=False)

    def render(self, **values: str) -> list[dict]:
        """The judge's chat messages with the placeholders filled in."""
        if self.kind == "pairwise" and not values.get("guidelines"):
            values["guidelines"] = self.guidelines

        def sub(m: re.Match) -> str:
            tok = m.group(0)
            if tok == "{{":
                return "{"
            if tok == "}}":
                return "}"
            return str(values.get(m.group(1), ""))

        messages = [{"role": "system", "content": self.system}] if self.system else []
        return messages + [{"role": "user", "content": _TOKEN.sub(sub, self.body).strip()}]


def shipped_templates() -> list[str]:
    folder = resources.files(__package__).joinpath("templates")
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".txt"))


def load_template(name: str) -> Template:
    """A shipped template by name (``quality``), or a template file by path."""
    if not name:
        raise AlignkitError("judge template is empty; use one of " + ", ".join(shipped_templates()) + " or a file")
    shipped = resources.files(__package__).joinpath("templates", f"{name}.txt")
    if "/" not in name and not name.endswith(".txt") and shipped.is_file():
        return parse_template(shipped.read_text(encoding="utf-8"), name, f"alignkit/judges/templates/{name}.txt")
    path = Path(name)
    if not path.is_file():
        raise AlignkitError(f"judge template '{name}' is neither a shipped template "
                            f"({', '.join(shipped_templates())}) nor a file")
    from alignkit.data.io import read_text

    return parse_template(read_text(path, "judge template"), path.stem, str(path))


def parse_template(text: str, name: str, source: str) -> Template:
    header, body, body_line = _split_header(text, source)
    unknown = set(header) - _HEADER_KEYS
    if unknown:
        raise AlignkitError(f"{source}:1: unknown header key(s) {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(sorted(_HEADER_KEYS))}")
    kind = header.get("kind", "scalar")
    if kind not in KINDS:
        raise AlignkitError(f"{source}:1: field 'kind' must be scalar or pairwise, got {kind!r}")
    used = set()
    for lineno, line in enumerate(body.splitlines(), body_line):
        for m in _TOKEN.finditer(line):
            if m.group(1) is None:
                continue
            if m.group(1) not in PLACEHOLDERS[kind]:
                raise AlignkitError(f"{source}:{lineno}: unknown placeholder {{{m.group(1)}}} in a {kind} template; "
                                    f"known: {', '.join('{' + p + '}' for p in sorted(PLACEHOLDERS[kind]))} "
                                    f"(write {{{{ }}}} for literal braces)")
            used.add(m.group(1))
    missing = REQUIRED[kind] - used
    if missing:
        raise AlignkitError(f"{source}: a {kind} template needs the placeholder(s) "
                            + ", ".join("{" + p + "}" for p in sorted(missing)))
    low = high = None
    if kind == "scalar":
        for key in ("min", "max"):
            if key not in header:
                raise AlignkitError(f"{source}:1: a scalar template needs '{key}' (the score range)")
        # finite numbers, checked as a config's keys are: '.inf' would make every midpoint fallback infinite
        scale = build(_Scale, {"min": header["min"], "max": header["max"]}, f"{source}:1")
        low, high = scale.min, scale.max
        if not low < high:
            raise AlignkitError(f"{source}:1: 'min' ({low}) must be below 'max' ({high})")
    options = tuple(header.get("options", ("(A)", "(B)")))
    if len(options) != 2 or not all(isinstance(o, str) and o.strip() for o in options) or options[0] == options[1]:
        raise AlignkitError(f"{source}:1: 'options' must be two different answer strings, e.g. [\"(A)\", \"(B)\"]")
    return Template(name=name, source=source, text=text, kind=kind, body=body, low=low, high=high,
                    system=header.get("system"), guidelines=str(header.get("guidelines", "")).strip(),
                    options=options, answer_prefix=str(header.get("answer_prefix", "")),
                    description=str(header.get("description", "")).strip(), meta=header)


def _split_header(text: str, source: str) -> tuple[dict, str, int]:
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}, text, 1
    for end in range(1, len(lines)):
        if lines[end].strip() == "---":
            try:
                header = yaml.safe_load("\n".join(lines[1:end])) or {}
            except yaml.YAMLError as e:
                raise AlignkitError(f"{source}: invalid YAML header: {e}") from None
            if not isinstance(header, dict):
                raise AlignkitError(f"{source}:2: the header must be a mapping of keys")
            return header, "\n".join(lines[end + 1:]), end + 2
    raise AlignkitError(f"{source}:1: the header opened with '---' is never closed")
