"""Where labels live: SQLAlchemy 2 models and the operations the app performs.

SQLite is the default (one file; WAL mode so readers never wait for the writer)
and PostgreSQL works by URL. Two rules keep labels exact under retries, many
labelers at once and a server killed at any moment:

- one label per (item, labeler), enforced by a unique constraint; submitting
  again is an upsert that changes the same row, so a retried request can never
  store a second copy;
- a request is acknowledged only after its transaction has committed.

SQLite allows one writer at a time. Write transactions start with
``BEGIN IMMEDIATE`` (taking the write lock up front, so a read-then-write never
fails half-way with SQLITE_BUSY) and, inside one process, queue on a lock
instead of spinning in SQLite's busy handler. PostgreSQL serialises the choice
of tasks by locking the project row.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import unquote_plus

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from alignkit.errors import AlignkitError
from alignkit.feedback.items import KINDS, ProjectFile

CHOICES = ("A", "B", "tie", "both_bad")  # what a labeler sees: A = left, B = right
WINNERS = ("model_a", "model_b", "tie", "both_bad")  # what is stored: real model names
MAX_TASK_BATCH = 500
MAX_OVERLAP = 1000  # labelers per item; the CLI and the API take the same range
PROJECT_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")  # it appears in URLs


def utcnow() -> datetime:
    # Naive UTC: SQLite has no time zones, and one convention for both back ends.
    return datetime.now(timezone.utc).replace(tzinfo=None)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class FeedbackError(AlignkitError):
    """A request the app refuses; ``status`` is the HTTP status it maps to."""

    status = 400


class NotFound(FeedbackError):
    status = 404


class Conflict(FeedbackError):
    status = 409


class Invalid(FeedbackError):
    status = 422


# ---------------------------------------------------------------------------
# schema


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "fb_projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    overlap: Mapped[int] = mapped_column(Integer)
    model_a: Mapped[str | None] = mapped_column(String(300))
    model_b: Mapped[str | None] = mapped_column(String(300))
    guidelines: Mapped[str | None] = mapped_column(Text)  # None: the app's default guidelines
    source: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Item(Base):
    __tablename__ = "fb_items"
    __table_args__ = (
        UniqueConstraint("project_id", "ext_id"),
        Index("ix_fb_items_pick", "project_id", "n_assigned", "position"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("fb_projects.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    ext_id: Mapped[str] = mapped_column(String(200))
    prompt: Mapped[object] = mapped_column(JSON)
    completions: Mapped[list] = mapped_column(JSON)  # pairwise: [model_a's, model_b's]
    n_completions: Mapped[int] = mapped_column(Integer)  # K, so a submit need not load the texts
    swapped: Mapped[bool] = mapped_column(Boolean, default=False)  # pairwise: model_b shown as A
    meta: Mapped[dict] = mapped_column(JSON)
    n_assigned: Mapped[int] = mapped_column(Integer, default=0)  # rows in fb_assignments


class Labeler(Base):
    __tablename__ = "fb_labelers"
    __table_args__ = (UniqueConstraint("project_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("fb_projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # the token itself is never stored
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Assignment(Base):
    """An item handed to a labeler; it counts towards the item's overlap.

    ``expires_at`` is cleared once the labeler has answered; an unanswered one
    that expires is deleted so that another labeler can take the slot.
    """

    __tablename__ = "fb_assignments"
    __table_args__ = (UniqueConstraint("item_id", "labeler_id"), Index("ix_fb_assignments_expiry", "project_id", "expires_at"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("fb_projects.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("fb_items.id", ondelete="CASCADE"))
    labeler_id: Mapped[int] = mapped_column(ForeignKey("fb_labelers.id", ondelete="CASCADE"), index=True)
    assigned_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime)


class Label(Base):
    __tablename__ = "fb_labels"
    __table_args__ = (UniqueConstraint("item_id", "labeler_id"), Index("ix_fb_labels_project", "project_id"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("fb_projects.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("fb_items.id", ondelete="CASCADE"))
    labeler_id: Mapped[int] = mapped_column(ForeignKey("fb_labelers.id", ondelete="CASCADE"))
    ranks: Mapped[list | None] = mapped_column(JSON)  # ranking: 1 = best, equal = tie
    cant_rank: Mapped[bool] = mapped_column(Boolean, default=False)
    winner: Mapped[str | None] = mapped_column(String(16))  # pairwise: one of WINNERS
    revision: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    # The client's order of the submission this label holds (``order`` in the API): one that
    # arrives later but was made earlier (its first delivery held up) changes nothing.
    client_order: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Submission(Base):
    """The client-chosen ids of submissions already seen (applied, or found unchanged): sending one again is a no-op,
    even after a newer edit of the same label (a late retry must not undo it)."""

    __tablename__ = "fb_submissions"
    __table_args__ = (UniqueConstraint("labeler_id", "submission_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("fb_labelers.id", ondelete="CASCADE"))
    submission_id: Mapped[str] = mapped_column(String(64))
    label_id: Mapped[int] = mapped_column(ForeignKey("fb_labels.id", ondelete="CASCADE"))


# ---------------------------------------------------------------------------
# The statements every label goes through, built once. Building a statement
# costs more than SQLite takes to run it; these are compiled once and cached.

_items, _labels, _labelers, _projects = Item.__table__, Label.__table__, Labeler.__table__, Project.__table__
_assignments, _submissions = Assignment.__table__, Submission.__table__

_LABELER_BY_TOKEN = (
    select(_labelers.c.id, _labelers.c.name, _projects.c.name, _projects.c.id, _projects.c.kind)
    .join(_projects, _projects.c.id == _labelers.c.project_id)
    .where(_labelers.c.token_hash == bindparam("token_hash"))
)
_ITEM_TO_LABEL = select(_items.c.project_id, _items.c.swapped, _items.c.n_completions).where(_items.c.id == bindparam("item_id"))
_APPLIED = (
    select(_submissions.c.label_id, _labels.c.item_id)
    .join(_labels, _labels.c.id == _submissions.c.label_id)
    .where(_submissions.c.labeler_id == bindparam("labeler_id"), _submissions.c.submission_id == bindparam("submission_id"))
)
_EXISTING_LABEL = select(_labels.c.id, _labels.c.ranks, _labels.c.cant_rank, _labels.c.winner,
                         _labels.c.client_order).where(
    _labels.c.item_id == bindparam("item_id"), _labels.c.labeler_id == bindparam("labeler_id")
)
_CHANGE_LABEL = (
    _labels.update()
    .where(_labels.c.id == bindparam("label_id"))
    .values(ranks=bindparam("new_ranks", type_=JSON), cant_rank=bindparam("new_cant_rank"),
            winner=bindparam("new_winner"), updated_at=bindparam("now"), revision=_labels.c.revision + 1,
            client_order=bindparam("new_order"))
)
_RAISE_ORDER = _labels.update().where(_labels.c.id == bindparam("label_id")).values(client_order=bindparam("new_order"))
_ANSWER_ASSIGNMENT = (
    _assignments.update()
    .where(_assignments.c.item_id == bindparam("the_item"), _assignments.c.labeler_id == bindparam("the_labeler"))
    .values(expires_at=None)
)
_INSERT_LABEL = _labels.insert()
_INSERT_SUBMISSION = _submissions.insert()


# ---------------------------------------------------------------------------
# plain results handed to the server, the CLI and the exporters


@dataclass
class LabelerInfo:
    id: int
    name: str
    project: str
    project_id: int
    kind: str


@dataclass
class Task:
    """An item as a labeler sees it: no model names, sides already shuffled."""

    item_id: int
    project: str
    kind: str
    prompt: str | list[dict]
    completions: list[str]  # display order
    my_label: dict | None = None

    def to_dict(self) -> dict:
        return {
            "item_id": self.item_id,
            "project": self.project,
            "kind": self.kind,
            "prompt": self.prompt,
            "completions": self.completions,
            "my_label": self.my_label,
        }


@dataclass
class LabelRecord:
    labeler: str
    ranks: list[int] | None
    cant_rank: bool
    winner: str | None


@dataclass
class ItemRecord:
    """An item with every label on it, in real (unshuffled) terms, for export."""

    ext_id: str
    prompt: str | list[dict]
    completions: list[str]
    meta: dict
    labels: list[LabelRecord] = field(default_factory=list)


@dataclass
class ProjectSummary:
    name: str
    kind: str
    overlap: int
    n_items: int
    n_labels: int
    n_items_complete: int  # items with at least `overlap` labels
    n_labelers: int
    model_a: str | None = None
    model_b: str | None = None
    labelers: dict[str, int] = field(default_factory=dict)  # name -> labels given

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["progress"] = self.n_labels / max(1, self.n_items * self.overlap)
        return d


# ---------------------------------------------------------------------------
# label validation (pure)


def normalise_ranks(ranks: object, k: int) -> list[int]:
    """Check a ranking of k completions and write it in dense form.

    ``ranks[i]`` is the 1-based rank of completion i, equal numbers are ties.
    Any order-preserving numbering is accepted and stored dense, the form that
    alignkit's ranking reader takes: ties share a rank and the next rank
    follows, so [1, 1, 3] becomes [1, 1, 2].

    >>> normalise_ranks([2, 1, 2], 3)
    [2, 1, 2]
    >>> normalise_ranks([1, 1, 3], 3)
    [1, 1, 2]
    """
    if not isinstance(ranks, list) or len(ranks) != k:
        raise Invalid(f"ranks must be a list of {k} integers, one per completion")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= k:
            raise Invalid(f"each rank must be an integer from 1 to {k}, got {r!r}")
    dense = {r: i for i, r in enumerate(sorted(set(ranks)), 1)}
    return [dense[r] for r in ranks]


def check_labeler_name(name: str) -> str:
    """A labeler's name, stripped; refused when it is empty, too long, or not a name a person can read.

    Control characters (NUL, line breaks, escapes) would corrupt the status lines and exports, and
    PostgreSQL cannot store NUL at all; a name of only invisible characters names nobody.

    >>> check_labeler_name("  Zoë ")
    'Zoë'
    """
    name = name.strip()
    if not name or len(name) > 200:
        raise Invalid("labeler: a labeler name must have 1 to 200 characters")
    bad = next((ch for ch in name if unicodedata.category(ch) == "Cc"), None)
    if bad is not None:
        raise Invalid(f"labeler: a labeler name must not hold control characters (it holds U+{ord(bad):04X})")
    if all(unicodedata.category(ch)[0] in "CZ" for ch in name):
        raise Invalid("labeler: a labeler name must hold a visible character")
    return name


def _check_overlap(overlap: int) -> None:
    # Checked here, where every way in (CLI, API) passes: an overlap past a 64-bit integer
    # would otherwise reach the database as a driver error.
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 1 <= overlap <= MAX_OVERLAP:
        raise Invalid(f"overlap must be an integer from 1 to {MAX_OVERLAP} (labelers per item), got {overlap!r}")


def choice_to_winner(choice: str, swapped: bool) -> str:
    """Map what the labeler clicked (A = left) to the real model."""
    if choice == "A":
        return "model_b" if swapped else "model_a"
    if choice == "B":
        return "model_a" if swapped else "model_b"
    return choice


def winner_to_choice(winner: str, swapped: bool) -> str:
    if winner == "model_a":
        return "B" if swapped else "A"
    if winner == "model_b":
        return "A" if swapped else "B"
    return winner


# ---------------------------------------------------------------------------
# the store


def _url_secrets(url: str) -> list[str]:
    """The passwords a --db URL holds, as written and decoded, longest first.

    Found in the text itself, parsed or not: ``scheme://user:PASSWORD@`` or, with no scheme,
    ``user:PASSWORD@`` (up to the last '@', so an unescaped '@' in a password hides all of it),
    and ``?password=PASSWORD``.
    """
    found = []
    m = re.search(r"://[^:/@\s]*:" if "://" in url else r"(?:^|\s)[^:/@\s]*:", url)
    if m and "@" in url[m.end():]:
        hidden = url[m.end():url.rindex("@")]
        found += [hidden, *hidden.split("@")]
    found += re.findall(r"(?i)[?&]password=([^&#]*)", url)
    found += [unquote_plus(f) for f in found]
    return sorted({f for f in found if f}, key=len, reverse=True)


def hide_password(text: str, url: str) -> str:
    """``text`` (a message about the --db ``url``) with every password ``url`` holds replaced by ***."""
    for secret in _url_secrets(url):
        text = text.replace(secret, "***")
    return text


def shown_url(url: str) -> str:
    """A --db URL as messages show it: SQLAlchemy's rendering without the password, where it parses."""
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: the text, masked
        shown = url
    return hide_password(shown, url)


def _create_engine(url, shown: str, kwargs: dict):
    try:
        return create_engine(url, **kwargs)
    except (ArgumentError, ImportError) as e:  # an unknown dialect, a driver that is not installed
        raise AlignkitError(f"--db {shown}: cannot use this database ({str(e).splitlines()[0]})") from None


def _add_missing_columns(engine) -> None:
    """Columns added since a database was created (create_all makes missing tables, not columns):
    a database from an earlier version gains them, empty, and keeps working."""
    from sqlalchemy import inspect, text

    have = {c["name"] for c in inspect(engine).get_columns(Label.__tablename__)}
    if "client_order" not in have:
        with engine.begin() as c:
            c.execute(text(f"ALTER TABLE {Label.__tablename__} ADD COLUMN client_order BIGINT"))


class Store:
    """The database, and every operation the app performs on it."""

    def __init__(self, url: str, *, sqlite_synchronous: str = "NORMAL", assignment_ttl_s: int = 2 * 3600, **engine_kwargs):
        """Open (and create the tables of) the database at ``url``.

        Any failure is an AlignkitError of one line that shows the URL without its password.
        """
        if not isinstance(url, str):  # a sqlalchemy URL: str() would put *** in place of its password
            url = url.render_as_string(hide_password=False)
        self.assignment_ttl = timedelta(seconds=assignment_ttl_s)
        self.engine = None
        try:
            self._open(url, sqlite_synchronous, engine_kwargs)
        except AlignkitError as e:
            raise AlignkitError(hide_password(str(e), url)) from None
        except Exception as e:  # any failure to build or open the engine: a driver's own errors are unforeseeable
            if self.engine is not None:
                self.engine.dispose()
            orig = getattr(e, "orig", None) or e  # a DBAPIError's driver error says what went wrong
            detail = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
            raise AlignkitError(hide_password(f"--db {shown_url(url)}: cannot open the database ({detail})", url)) from None

    def _open(self, url: str, sqlite_synchronous: str, engine_kwargs: dict) -> None:
        try:
            self.url = make_url(url)
            self.is_sqlite = self.url.get_backend_name() == "sqlite"
        except (ArgumentError, ValueError) as e:
            raise AlignkitError(f"--db {shown_url(url)}: not a database URL ({str(e).splitlines()[0]}); use "
                                f"sqlite:///path/to/labels.db or postgresql+psycopg://user@host/db") from None
        shown = shown_url(url)
        if self.is_sqlite:
            if not self.url.database or self.url.database == ":memory:":
                raise AlignkitError("the feedback app needs a SQLite file, not an in-memory database")
            if Path(self.url.database).is_dir():
                raise AlignkitError(f"--db {shown}: {self.url.database} is a folder; name a file in it "
                                    f"(sqlite:///{Path(self.url.database) / 'labels.db'})")
            try:
                Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise AlignkitError(f"--db {shown}: cannot create its folder ({e.strerror or e})") from None
            engine_kwargs.setdefault("connect_args", {"timeout": 30, "check_same_thread": False})
            self.engine = _create_engine(self.url, shown, engine_kwargs)
            self._writing = threading.local()  # set while this thread is in write(): BEGIN IMMEDIATE
            _sqlite_setup(self.engine, sqlite_synchronous, lambda: getattr(self._writing, "on", False))
            self._write_lock = threading.Lock()
        else:
            engine_kwargs.setdefault("pool_size", 10)
            engine_kwargs.setdefault("max_overflow", 30)
            engine_kwargs.setdefault("pool_pre_ping", True)
            self.engine = _create_engine(self.url, shown, engine_kwargs)
            self._write_lock = nullcontext()
        Base.metadata.create_all(self.engine)  # not a database file, no server there, no access: see __init__
        _add_missing_columns(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s:
            yield s

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One committed transaction; returns only after the commit."""
        with self._write_lock, self._write_mode(), Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    @contextmanager
    def write_conn(self) -> Iterator[Connection]:
        """Like :meth:`write`, on a bare Core connection (the per-label path)."""
        with self._write_lock, self._write_mode(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _write_mode(self) -> Iterator[None]:
        # A thread-local flag rather than engine.execution_options(): an option
        # engine sets up event dispatch again for every connection it hands out.
        if not self.is_sqlite:
            yield
            return
        self._writing.on = True
        try:
            yield
        finally:
            self._writing.on = False

    # -- projects ----------------------------------------------------------

    def create_project(self, name: str, pf: ProjectFile, overlap: int, source: str = "", guidelines: str | None = None) -> ProjectSummary:
        if not PROJECT_NAME.fullmatch(name):
            raise Invalid(f"project name {name!r}: use 1 to 100 letters, digits, '.', '_' or '-'")
        if pf.kind not in KINDS:
            raise Invalid(f"unknown project kind {pf.kind!r}")
        _check_overlap(overlap)
        if guidelines is not None and "\x00" in guidelines:
            raise Invalid("guidelines: the guidelines hold a NUL character (\\u0000)")  # PostgreSQL's text cannot
        # The source is only shown: text any database stores (an upload's file name is the client's bytes).
        source = source.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
        rng = secrets.SystemRandom()  # labelers must not be able to predict the sides
        with self.write() as s:
            if s.scalar(select(Project.id).where(Project.name == name)) is not None:
                raise Conflict(f"a project named {name!r} exists already")
            project = Project(
                name=name, kind=pf.kind, overlap=overlap, model_a=pf.model_a, model_b=pf.model_b,
                guidelines=guidelines, source=source[:500], created_at=utcnow(),
            )
            s.add(project)
            s.flush()
            s.add_all(
                Item(
                    project_id=project.id, position=i, ext_id=spec.ext_id, prompt=spec.prompt,
                    completions=spec.completions, n_completions=len(spec.completions), meta=spec.meta, n_assigned=0,
                    swapped=(pf.kind == "pairwise" and rng.random() < 0.5),
                )
                for i, spec in enumerate(pf.items)
            )
        return self.project_summary(name)

    def set_overlap(self, name: str, overlap: int) -> ProjectSummary:
        _check_overlap(overlap)
        with self.write() as s:
            project = self._project(s, name)
            project.overlap = overlap
        return self.project_summary(name)

    def project_names(self) -> list[str]:
        with self.read() as s:
            return list(s.scalars(select(Project.name).order_by(Project.id)))

    def project_summary(self, name: str) -> ProjectSummary:
        with self.read() as s:
            project = self._project(s, name)
            n_items = s.scalar(select(func.count()).select_from(Item).where(Item.project_id == project.id))
            per_item = (
                select(Label.item_id, func.count().label("n")).where(Label.project_id == project.id).group_by(Label.item_id).subquery()
            )
            n_complete = s.scalar(select(func.count()).select_from(per_item).where(per_item.c.n >= project.overlap))
            labelers = dict(
                s.execute(
                    select(Labeler.name, func.count(Label.id))
                    .outerjoin(Label, Label.labeler_id == Labeler.id)
                    .where(Labeler.project_id == project.id)
                    .group_by(Labeler.id, Labeler.name)
                    .order_by(Labeler.name)
                ).all()
            )
            return ProjectSummary(
                name=project.name, kind=project.kind, overlap=project.overlap, n_items=n_items,
                n_labels=sum(labelers.values()), n_items_complete=n_complete, n_labelers=len(labelers),
                model_a=project.model_a, model_b=project.model_b, labelers=labelers,
            )

    def project_guidelines(self, project_id: int) -> str | None:
        with self.read() as s:
            return s.scalar(select(Project.guidelines).where(Project.id == project_id))

    # -- labelers ----------------------------------------------------------

    def invite(self, project: str, labeler: str) -> str:
        """Create a labeler (or give an existing one a new token); returns the token.

        The token is shown once: only its hash is stored, and inviting the same
        name again revokes the old link.
        """
        labeler = check_labeler_name(labeler)
        token = secrets.token_urlsafe(24)
        with self.write() as s:
            p = self._project(s, project)
            row = s.scalar(select(Labeler).where(Labeler.project_id == p.id, Labeler.name == labeler))
            if row is None:
                s.add(Labeler(project_id=p.id, name=labeler, token_hash=hash_token(token), created_at=utcnow()))
            else:
                row.token_hash = hash_token(token)
        return token

    def labeler_for_token(self, token: str) -> LabelerInfo | None:
        if not token or len(token) > 200:
            return None
        with self.engine.connect() as c:  # every API request comes through here
            row = c.execute(_LABELER_BY_TOKEN, {"token_hash": hash_token(token)}).first()
        return LabelerInfo(*row) if row else None

    # -- tasks -------------------------------------------------------------

    def next_tasks(self, who: LabelerInfo, limit: int = 1) -> list[Task]:
        """The labeler's unanswered tasks, topped up with new items to ``limit``.

        Open tasks come first, so asking again (say, after a lost response)
        returns the same items. New items go to those with the fewest labelers
        so far (then file order): every item gets a first label before any gets
        a second, and no item is handed to more than ``overlap`` labelers.
        """
        limit = max(1, min(int(limit), MAX_TASK_BATCH))
        now = utcnow()
        with self.write() as s:
            project = s.scalar(select(Project).where(Project.id == who.project_id).with_for_update())
            if project is None:
                raise NotFound("project not found")
            self._reclaim_expired(s, project.id, now)
            open_ids = list(
                s.scalars(
                    select(Assignment.item_id)
                    .where(Assignment.labeler_id == who.id, Assignment.expires_at.is_not(None))
                    .order_by(Assignment.assigned_at, Assignment.item_id)
                    .limit(limit)
                )
            )
            # Refresh the lease of what is handed out again.
            if open_ids:
                s.execute(
                    update(Assignment)
                    .where(Assignment.labeler_id == who.id, Assignment.item_id.in_(open_ids))
                    .values(expires_at=now + self.assignment_ttl)
                )
            if len(open_ids) < limit:
                mine = select(Assignment.item_id).where(Assignment.labeler_id == who.id)
                new_ids = list(
                    s.scalars(
                        select(Item.id)
                        .where(Item.project_id == project.id, Item.n_assigned < project.overlap, Item.id.not_in(mine))
                        .order_by(Item.n_assigned, Item.position)
                        .limit(limit - len(open_ids))
                    )
                )
                if new_ids:
                    s.execute(
                        insert(Assignment),
                        [dict(project_id=project.id, item_id=i, labeler_id=who.id, assigned_at=now,
                              expires_at=now + self.assignment_ttl) for i in new_ids],
                    )
                    s.execute(update(Item).where(Item.id.in_(new_ids)).values(n_assigned=Item.n_assigned + 1))
                open_ids += new_ids
            items = {i.id: i for i in s.scalars(select(Item).where(Item.id.in_(open_ids)))} if open_ids else {}
            return [self._task(project, items[i], None) for i in open_ids]

    def task(self, who: LabelerInfo, item_id: int) -> Task:
        """One item of the labeler's project, with their own label if any."""
        with self.read() as s:
            item = s.get(Item, item_id)
            if item is None or item.project_id != who.project_id:
                raise NotFound(f"no item {item_id} in this project")
            project = s.get(Project, who.project_id)
            label = s.scalar(select(Label).where(Label.item_id == item_id, Label.labeler_id == who.id))
            return self._task(project, item, label)

    def _task(self, project: Project, item: Item, label: Label | None) -> Task:
        completions = list(item.completions)
        if item.swapped:
            completions.reverse()
        return Task(item.id, project.name, project.kind, item.prompt, completions, _my_label(label, item) if label else None)

    def _reclaim_expired(self, s: Session, project_id: int, now: datetime) -> None:
        expired = s.execute(
            select(Assignment.id, Assignment.item_id).where(
                Assignment.project_id == project_id, Assignment.expires_at.is_not(None), Assignment.expires_at < now
            )
        ).all()
        for assignment_id, item_id in expired:
            s.execute(delete(Assignment).where(Assignment.id == assignment_id))
            s.execute(update(Item).where(Item.id == item_id).values(n_assigned=Item.n_assigned - 1))

    # -- labels ------------------------------------------------------------

    def submit(
        self,
        who: LabelerInfo,
        item_id: int,
        *,
        ranks: list[int] | None = None,
        cant_rank: bool = False,
        choice: str | None = None,
        submission_id: str | None = None,
        order: int | None = None,
    ) -> tuple[int, str]:
        """Store the labeler's label on an item: -> (label id, "created" | "updated" | "unchanged").

        Idempotent: sending the same label again changes nothing, and neither does
        resending a ``submission_id`` that was applied before (ids are per labeler).
        ``order`` is the client's order of its submissions (a clock or a counter): a
        submission older than the one the label holds changes nothing, so a submission
        whose first delivery arrives after a newer one's cannot undo it either.
        A labeler may change their own label at any time; nobody else's.
        """
        for attempt in range(3):
            try:
                return self._submit_once(who, item_id, ranks, cant_rank, choice, submission_id, order)
            except IntegrityError:
                # PostgreSQL: the same labeler's concurrent request inserted the row
                # first. Retrying turns this one into an update of that row.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _submit_once(self, who, item_id, ranks, cant_rank, choice, submission_id, order) -> tuple[int, str]:
        # The hot path of the app: prebuilt Core statements on a bare connection.
        now = utcnow()
        key = {"item_id": item_id, "labeler_id": who.id}
        with self.write_conn() as c:
            item = c.execute(_ITEM_TO_LABEL, key).first()
            if item is None or item.project_id != who.project_id:
                raise NotFound(f"no item {item_id} in this project")
            ranks, cant_rank, winner = _check_label(who.kind, item.n_completions, item.swapped, ranks, cant_rank, choice)
            if submission_id is not None:
                applied = c.execute(_APPLIED, {"labeler_id": who.id, "submission_id": submission_id}).first()
                if applied is not None:
                    if applied.item_id != item_id:
                        # A resend carries the same item; this is another label under a used id, and
                        # answering "unchanged" would drop it without a word.
                        raise Conflict(f"submission_id {submission_id!r} was already used for item {applied.item_id}; "
                                       f"send each new label with a new submission_id")
                    return applied.label_id, "unchanged"

            label = c.execute(_EXISTING_LABEL, key).first()
            if label is not None:
                same = (label.ranks, bool(label.cant_rank), label.winner) == (ranks, cant_rank, winner)
                older = order is not None and label.client_order is not None and order < label.client_order
                if same and not older and order is not None and order != label.client_order:
                    # the same label, submitted later: it is now the newest, and an older
                    # submission that arrives after it must not change it
                    c.execute(_RAISE_ORDER, {"label_id": label.id, "new_order": order})
                if older or same:
                    # Recorded too: a late retry of this submission, after a newer edit, must find
                    # it applied and change nothing (the rule every submission id follows).
                    self._record_submission(c, who, submission_id, label.id)
                    return label.id, "unchanged"
                c.execute(_CHANGE_LABEL, {"label_id": label.id, "new_ranks": ranks, "new_cant_rank": cant_rank,
                                          "new_winner": winner, "now": now,
                                          "new_order": order if order is not None else label.client_order})
                self._record_submission(c, who, submission_id, label.id)
                return label.id, "updated"

            if c.execute(_ANSWER_ASSIGNMENT, {"the_item": item_id, "the_labeler": who.id}).rowcount == 0:
                # Never handed out, or the lease ran out and the slot was reclaimed:
                # accept if the item still has room.
                overlap = c.scalar(select(Project.overlap).where(Project.id == who.project_id).with_for_update())
                n_assigned = c.scalar(select(Item.n_assigned).where(Item.id == item_id))
                if n_assigned >= overlap:
                    raise Conflict(f"item {item_id} already has its {overlap} labelers")
                c.execute(insert(Assignment).values(project_id=who.project_id, item_id=item_id, labeler_id=who.id,
                                                    assigned_at=now, expires_at=None))
                c.execute(update(Item).where(Item.id == item_id).values(n_assigned=Item.n_assigned + 1))
            result = c.execute(
                _INSERT_LABEL,
                {"project_id": who.project_id, "item_id": item_id, "labeler_id": who.id, "ranks": ranks,
                 "cant_rank": cant_rank, "winner": winner, "revision": 1, "created_at": now, "updated_at": now,
                 "client_order": order},
            )
            label_id = result.inserted_primary_key[0]
            self._record_submission(c, who, submission_id, label_id)
            return label_id, "created"

    @staticmethod
    def _record_submission(c: Connection, who: LabelerInfo, submission_id: str | None, label_id: int) -> None:
        if submission_id is not None:
            c.execute(_INSERT_SUBMISSION, {"labeler_id": who.id, "submission_id": submission_id, "label_id": label_id})

    def my_labels(self, who: LabelerInfo) -> list[dict]:
        with self.read() as s:
            rows = s.execute(
                select(Label, Item).join(Item, Item.id == Label.item_id).where(Label.labeler_id == who.id).order_by(Label.updated_at.desc(), Label.id.desc())
            ).all()
            return [{"item_id": item.id, **_my_label(label, item), "updated_at": label.updated_at.isoformat() + "Z"} for label, item in rows]

    def progress(self, who: LabelerInfo) -> dict:
        with self.read() as s:
            done = s.scalar(select(func.count()).select_from(Label).where(Label.labeler_id == who.id))
            open_ = s.scalar(
                select(func.count()).select_from(Assignment).where(Assignment.labeler_id == who.id, Assignment.expires_at.is_not(None))
            )
        return {"labeler": who.name, "project": who.project, "kind": who.kind, "done": done, "open": open_}

    # -- export ------------------------------------------------------------

    def project_records(self, name: str) -> tuple[Project, list[ItemRecord]]:
        """Every item of a project with its labels, in file order."""
        with self.read() as s:
            project = self._project(s, name)
            records: dict[int, ItemRecord] = {}
            for item in s.scalars(select(Item).where(Item.project_id == project.id).order_by(Item.position)):
                records[item.id] = ItemRecord(item.ext_id, item.prompt, list(item.completions), dict(item.meta or {}))
            rows = s.execute(
                select(Label.item_id, Labeler.name, Label.ranks, Label.cant_rank, Label.winner)
                .join(Labeler, Labeler.id == Label.labeler_id)
                .where(Label.project_id == project.id)
                .order_by(Label.item_id, Labeler.name)
            )
            for item_id, labeler, ranks, cant_rank, winner in rows:
                records[item_id].labels.append(LabelRecord(labeler, ranks, bool(cant_rank), winner))
            return project, list(records.values())

    def _project(self, s: Session, name: str) -> Project:
        project = s.scalar(select(Project).where(Project.name == name))
        if project is None:
            raise NotFound(f"no project named {name!r}")
        return project


def _my_label(label: Label, item: Item) -> dict:
    if label.winner is not None:
        return {"choice": winner_to_choice(label.winner, item.swapped)}
    return {"ranks": label.ranks, "cant_rank": bool(label.cant_rank)}


def _check_label(kind: str, k: int, swapped: bool, ranks, cant_rank: bool, choice) -> tuple[list[int] | None, bool, str | None]:
    """Validate a label -> (ranks, cant_rank, winner) as stored."""
    cant_rank = bool(cant_rank)
    if kind == "ranking":
        if choice is not None:
            raise Invalid("a ranking task takes 'ranks' or 'cant_rank', not 'choice'")
        if cant_rank:
            if ranks is not None:
                raise Invalid("send either 'ranks' or 'cant_rank': true, not both")
            return None, True, None
        return normalise_ranks(ranks, k), False, None
    if ranks is not None or cant_rank:
        raise Invalid("a pairwise task takes 'choice', not 'ranks' or 'cant_rank'")
    if choice not in CHOICES:
        raise Invalid(f"choice must be one of {', '.join(CHOICES)}")
    return None, False, choice_to_winner(choice, swapped)


def _sqlite_setup(engine, synchronous: str, writing) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Let SQLAlchemy's "begin" event issue BEGIN itself (the pysqlite driver's
        # own transaction handling would defer it and never take the write lock early).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writing() else "BEGIN")
