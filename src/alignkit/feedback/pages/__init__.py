"""Server-rendered pages: Jinja2 templates with autoescape, one small script.

Every prompt and completion is untrusted text: templates only ever print it
through autoescaping (never ``|safe``), and the Content-Security-Policy the
server sends forbids inline scripts, so even a missed escape could not run code.
The guidelines are Markdown with raw HTML switched off.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from xml.etree.ElementTree import Element

import jinja2
import markdown
from markupsafe import Markup
from markdown.treeprocessors import Treeprocessor

PAGES_DIR = Path(__file__).parent
STATIC_DIR = PAGES_DIR / "static"

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(PAGES_DIR),
    autoescape=True,  # every {{ value }} is HTML-escaped, whatever the file suffix
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def render(template: str, **context) -> str:
    return _env.get_template(template).render(**context)


SAFE_SCHEMES = ("http", "https", "mailto")
_SCHEME = re.compile(r"^([a-z][a-z0-9+.\-]*):")


def safe_url(url: str) -> bool:
    """Whether a link is relative or uses a safe scheme, read as a browser reads it.

    A browser decodes character references (``javascript&#58;``) and drops tabs,
    newlines and leading spaces or control characters before it reads the
    scheme; so does this check, on the decoded text.
    """
    decoded = re.sub(r"[\x00-\x20\x7f]", "", html.unescape(url)).lower()
    scheme = _SCHEME.match(decoded)
    return scheme is None or scheme.group(1) in SAFE_SCHEMES


class _DropUnsafeLinks(Treeprocessor):
    """Remove javascript:, data: and other schemes from links and images."""

    def run(self, root: Element) -> None:
        for el in root.iter():
            for attr in ("href", "src"):
                url = el.get(attr)
                if url is not None and not safe_url(url):
                    el.set(attr, "#")


def render_markdown(text: str) -> Markup:
    """Markdown -> HTML with raw HTML shown as text, not interpreted.

    The one value the templates print unescaped: it is HTML built here.
    """
    md = markdown.Markdown(extensions=["tables", "fenced_code"])
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    md.treeprocessors.register(_DropUnsafeLinks(md), "drop_unsafe_links", 0)
    return Markup(md.convert(text))
