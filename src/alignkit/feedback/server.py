"""The feedback web app: ``create_app(config)`` -> a FastAPI application.

Pages (server-rendered, a little JavaScript) and a JSON API under ``/api`` that
does everything the pages do, so scripts can label and export too; the schema
is at ``/openapi.json`` and browsable at ``/docs``.

Who may do what:

- a labeler holds a token (the invite link ``/l/<token>`` puts it in a cookie;
  scripts send ``Authorization: Bearer <token>``) and sees and changes only
  their own labels, in their own project;
- ``/admin`` pages and ``/api/projects...`` need the admin token.

Prompt and completion text is untrusted: the templates escape it, the
Content-Security-Policy forbids inline script, request bodies are capped
(``max_request_bytes``; project uploads ``max_upload_bytes``) and a JSON body's
strings must be text UTF-8 can encode (400 naming the field).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at
# run time, and the dependencies below are local to create_app.
import functools
import hmac
from contextlib import asynccontextmanager
from typing import Annotated, Literal
from urllib.parse import urlsplit

import anyio.to_thread
from fastapi import Depends, FastAPI, File, Form, HTTPException, Path, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from alignkit.errors import AlignkitError
from alignkit.feedback.agreement import project_agreement
from alignkit.feedback.config import LabelConfig
from alignkit.feedback.export import build_export
from alignkit.feedback.items import parse_project_bytes
from alignkit.feedback.pages import STATIC_DIR, render, render_markdown
from alignkit.feedback.storage import MAX_OVERLAP, MAX_TASK_BATCH, FeedbackError, LabelerInfo, Store
from alignkit.web import INT64_MAX, Int64, LimitBody, TextBody

LABELER_COOKIE = "alignkit_labeler"
ADMIN_COOKIE = "alignkit_admin"
UPLOAD_PATH = "/api/projects"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SQLITE_WORKER_THREADS = 8
ItemPath = Annotated[int, Path(ge=0, le=INT64_MAX)]
EXPORT_MEDIA = {".jsonl": "application/x-ndjson", ".json": "application/json"}


# ---------------------------------------------------------------------------
# API shapes (these make the OpenAPI schema)


class LabelIn(BaseModel):
    """A label on one item. Ranking: ``ranks`` or ``cant_rank``. Pairwise: ``choice``."""

    # strict: JSON types as written; lax parsing would read true as rank 1, "yes" as cant_rank
    model_config = ConfigDict(extra="forbid", strict=True)
    item_id: Int64
    ranks: list[Int64] | None = Field(None, description="ranks[i] = 1-based rank of completion i; 1 = best; equal = tie")
    cant_rank: bool = Field(False, description="the item is nonsensical or cannot be ranked")
    choice: Literal["A", "B", "tie", "both_bad"] | None = Field(None, description="pairwise: A = the first response shown")
    submission_id: str | None = Field(None, max_length=64, description="client-chosen id; resending it never stores twice")
    order: int | None = Field(None, ge=0, le=INT64_MAX,
                              description="the client's order of its submissions (a clock in ms or a counter): one "
                                          "older than the label's last applied submission changes nothing")


class LabelOut(BaseModel):
    label_id: int
    item_id: int
    status: Literal["created", "updated", "unchanged"]


class TaskOut(BaseModel):
    item_id: int
    project: str
    kind: Literal["ranking", "pairwise"]
    prompt: str | list[dict[str, str]]
    completions: list[str] = Field(description="in display order; pairwise: [A, B]")
    my_label: dict | None = None


class TasksOut(BaseModel):
    tasks: list[TaskOut]


class MeOut(BaseModel):
    labeler: str
    project: str
    kind: str
    done: int
    open: int


class MyLabelsOut(BaseModel):
    labels: list[dict]


class InviteIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    labeler: str = Field(min_length=1, max_length=200)


class InviteOut(BaseModel):
    labeler: str
    token: str
    link: str


class ProjectPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # true is not an overlap of 1
    overlap: int = Field(ge=1, le=MAX_OVERLAP)


class ProjectOut(BaseModel):
    name: str
    kind: str
    overlap: int
    n_items: int
    n_labels: int
    n_items_complete: int
    n_labelers: int
    model_a: str | None = None
    model_b: str | None = None
    labelers: dict[str, int]
    progress: float


def _upload_text(upload: UploadFile, field: str) -> str:
    """An uploaded text file, decoded as the CLI reads one: not UTF-8 is a 422 naming the field and the
    line, never text with U+FFFD put in silently."""
    raw = upload.file.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise HTTPException(422, f"{field}: {upload.filename}: line {line}: not UTF-8 text "
                                 f"(byte 0x{raw[e.start]:02x}; save the file as UTF-8)") from None
    if "\x00" in text:
        raise HTTPException(422, f"{field}: {upload.filename}: holds a NUL character (\\u0000)")
    return text


# ---------------------------------------------------------------------------
# middleware: body size limit and security headers (plain ASGI: cheap per request)


class _SecurityHeaders:
    """Plain ASGI (cheap per request): headers that keep untrusted text from acting as code."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        add_csp = not (path.startswith("/docs") or path.startswith("/redoc"))

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                if add_csp:
                    headers.append((b"content-security-policy", CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ---------------------------------------------------------------------------
# the app


def create_app(config: LabelConfig | None = None, store: Store | None = None) -> FastAPI:
    config = config or LabelConfig()
    admin_token, _ = config.resolve_admin_token()
    default_guidelines = config.guidelines_text()
    if store is None:
        store = Store(config.db_url, sqlite_synchronous=config.sqlite_synchronous, assignment_ttl_s=config.assignment_ttl_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if store.is_sqlite:
            # SQLite takes one writer at a time: a few worker threads keep it
            # busy, and forty (the default) only fight over the lock and the GIL.
            anyio.to_thread.current_default_thread_limiter().total_tokens = SQLITE_WORKER_THREADS
        yield
        store.close()

    app = FastAPI(
        title="alignkit feedback",
        summary="Human feedback for RLHF: ranking, pairwise evaluation, agreement, export.",
        lifespan=lifespan,
    )
    app.state.store = store
    app.state.config = config
    app.add_middleware(_SecurityHeaders)
    app.add_middleware(TextBody)  # a JSON string the database cannot store is a 400 naming its field
    app.add_middleware(LimitBody, limit_for=lambda path: config.max_upload_bytes if path == UPLOAD_PATH
                       else config.max_request_bytes)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @functools.lru_cache(maxsize=64)
    def guidelines_html(text: str):
        return render_markdown(text)

    def guidelines_for(who: LabelerInfo | None) -> str:
        text = store.project_guidelines(who.project_id) if who else None
        return text or default_guidelines

    # -- authentication --------------------------------------------------

    def _token(request: Request, cookie: str) -> tuple[str | None, bool]:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        return request.cookies.get(cookie), True

    def _check_origin(request: Request) -> None:
        # Cookies ride along with cross-site requests; a browser always says
        # where an unsafe request comes from, so refuse foreign origins.
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host"):
            raise HTTPException(403, "cross-origin request refused")

    async def labeler_token(request: Request) -> str:
        # async and database-free: it runs on the event loop, and the lookup
        # happens in the endpoint's worker thread (one thread hop per request).
        token, from_cookie = _token(request, LABELER_COOKIE)
        if not token:
            raise HTTPException(401, "a labeler token is needed: open your invite link, or send 'Authorization: Bearer <token>'")
        if from_cookie:
            _check_origin(request)
        return token

    def labeler(token: str) -> LabelerInfo:
        who = store.labeler_for_token(token)
        if who is None:
            raise HTTPException(401, "unknown or revoked labeler token: ask for a new invite link")
        return who

    async def admin(request: Request) -> None:
        token, from_cookie = _token(request, ADMIN_COOKIE)
        if not token or not hmac.compare_digest(token.encode(), admin_token.encode()):
            raise HTTPException(401, "the admin token is needed: 'Authorization: Bearer <admin token>'")
        if from_cookie:
            _check_origin(request)

    Token = Annotated[str, Depends(labeler_token)]
    Admin = Depends(admin)

    def page_labeler(request: Request) -> LabelerInfo | None:
        token = request.cookies.get(LABELER_COOKIE)
        return store.labeler_for_token(token) if token else None

    def page_admin(request: Request) -> bool:
        token = request.cookies.get(ADMIN_COOKIE)
        return bool(token) and hmac.compare_digest(token.encode(), admin_token.encode())

    # -- errors ----------------------------------------------------------

    @app.exception_handler(AlignkitError)
    async def _alignkit_error(request: Request, exc: AlignkitError):
        status = exc.status if isinstance(exc, FeedbackError) else 422
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": str(exc)}, status_code=status)
        html = render("message.html", heading="Not possible", text=str(exc), link=("/", "Start page"), who=None)
        return HTMLResponse(html, status_code=status)

    # -- labeler API -----------------------------------------------------

    @app.get("/api/me", response_model=MeOut, tags=["labeler"])
    def api_me(token: Token):
        """Who the token belongs to, and their progress."""
        return store.progress(labeler(token))

    @app.get("/api/tasks", response_model=TasksOut, tags=["labeler"])
    def api_tasks(token: Token, limit: Annotated[int, Query(ge=1, le=MAX_TASK_BATCH)] = 1):
        """Your open tasks, topped up with new items to ``limit`` (at most 500).

        Items you have not answered yet come first, so asking again returns the same ones.
        """
        return {"tasks": [t.to_dict() for t in store.next_tasks(labeler(token), limit)]}

    @app.get("/api/tasks/{item_id}", response_model=TaskOut, tags=["labeler"])
    def api_task(item_id: ItemPath, token: Token):
        """One item of your project, with your label on it if any."""
        return store.task(labeler(token), item_id).to_dict()

    @app.post("/api/labels", response_model=LabelOut, tags=["labeler"])
    def api_submit(body: LabelIn, token: Token):
        """Save your label on an item (create or change it). Safe to retry."""
        label_id, status = store.submit(
            labeler(token), body.item_id, ranks=body.ranks, cant_rank=body.cant_rank, choice=body.choice, submission_id=body.submission_id,
            order=body.order,
        )
        return {"label_id": label_id, "item_id": body.item_id, "status": status}

    @app.get("/api/labels", response_model=MyLabelsOut, tags=["labeler"])
    def api_my_labels(token: Token):
        """Your own labels, newest first."""
        return {"labels": store.my_labels(labeler(token))}

    @app.get("/api/guidelines", tags=["labeler"])
    def api_guidelines(request: Request) -> dict:
        """The guidelines (Markdown) of your project, or the default ones."""
        return {"markdown": guidelines_for(page_labeler_or_bearer(request))}

    def page_labeler_or_bearer(request: Request) -> LabelerInfo | None:
        token, _ = _token(request, LABELER_COOKIE)
        return store.labeler_for_token(token) if token else None

    # -- admin API -------------------------------------------------------

    @app.get("/api/projects", response_model=list[ProjectOut], tags=["admin"], dependencies=[Admin])
    def api_projects():
        return [store.project_summary(n).to_dict() for n in store.project_names()]

    @app.post(UPLOAD_PATH, response_model=ProjectOut, tags=["admin"], dependencies=[Admin])
    def api_create_project(
        name: Annotated[str, Form(pattern=r"^[A-Za-z0-9._-]{1,100}$")],
        kind: Annotated[Literal["ranking", "pairwise"], Form()],
        file: Annotated[UploadFile, File(description="JSONL written by alignkit generate / label-ai / eval")],
        overlap: Annotated[int, Form(ge=1, le=MAX_OVERLAP)] = 3,
        guidelines_file: Annotated[UploadFile | None, File(description="Markdown guidelines for this project")] = None,
    ):
        """Create a project from a JSONL file (multipart upload)."""
        source = file.filename or "upload.jsonl"
        pf = parse_project_bytes(file.file.read(), kind, source=source)
        guidelines = None
        if guidelines_file is not None and guidelines_file.filename:
            guidelines = _upload_text(guidelines_file, "guidelines_file") or None
        return store.create_project(name, pf, overlap, source=source, guidelines=guidelines).to_dict()

    @app.get("/api/projects/{name}", response_model=ProjectOut, tags=["admin"], dependencies=[Admin])
    def api_project(name: str):
        return store.project_summary(name).to_dict()

    @app.patch("/api/projects/{name}", response_model=ProjectOut, tags=["admin"], dependencies=[Admin])
    def api_patch_project(name: str, body: ProjectPatch):
        """Change how many labelers see each item."""
        return store.set_overlap(name, body.overlap).to_dict()

    @app.post("/api/projects/{name}/labelers", response_model=InviteOut, tags=["admin"], dependencies=[Admin])
    def api_invite(name: str, body: InviteIn):
        """Invite a labeler: returns their token and link (shown once; inviting again replaces it)."""
        token = store.invite(name, body.labeler)
        return {"labeler": body.labeler.strip(), "token": token, "link": f"{config.public_url()}/l/{token}"}

    @app.get("/api/projects/{name}/agreement", tags=["admin"], dependencies=[Admin])
    def api_agreement(name: str) -> dict:
        """Krippendorff's alpha (ordinal for rankings, nominal for pairwise) and Fleiss' kappa (pairwise)."""
        project, records = store.project_records(name)
        return project_agreement(project.kind, [r for r in records if r.labels])

    @app.get("/api/projects/{name}/export", tags=["admin"], dependencies=[Admin])
    def api_export_summary(name: str) -> dict:
        """What an export holds (counts, dropped items, agreement) and its file names."""
        summary, _ = build_export(store, name)
        return summary

    @app.get("/api/projects/{name}/export/{file}", tags=["admin"], dependencies=[Admin])
    def api_export_file(name: str, file: str):
        """One export file: rankings.jsonl, preferences.jsonl, winloss.jsonl, winloss_summary.json, export_summary.json."""
        _, files = build_export(store, name)
        if file not in files:
            raise HTTPException(404, f"no export file {file!r}; this project has {', '.join(sorted(files))}")
        media = EXPORT_MEDIA[file[file.rindex("."):]]
        return Response(files[file], media_type=media, headers={"content-disposition": f'attachment; filename="{name}.{file}"'})

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"ok": True}

    # -- labeler pages ---------------------------------------------------

    def labeler_page(template: str, who: LabelerInfo, **context) -> HTMLResponse:
        html = render(template, who=who, progress=store.progress(who), guidelines_html=guidelines_html(guidelines_for(who)), **context)
        return HTMLResponse(html)

    def sign_in_first() -> HTMLResponse:
        html = render("message.html", heading="Please open your invite link",
                      text="This page is for invited labelers. Open the link your project administrator sent you.", link=None, who=None)
        return HTMLResponse(html, status_code=401)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index(request: Request):
        if page_labeler(request):
            return RedirectResponse("/task", status_code=303)
        return HTMLResponse(render("index.html"))

    @app.get("/l/{token}", include_in_schema=False)
    def invite_link(token: str, request: Request):
        if store.labeler_for_token(token) is None:
            html = render("message.html", heading="This link is not valid", text="Ask your project administrator for a new one.", link=None, who=None)
            return HTMLResponse(html, status_code=404)
        resp = RedirectResponse("/task", status_code=303)
        resp.set_cookie(LABELER_COOKIE, token, httponly=True, samesite="lax", max_age=180 * 24 * 3600,
                        secure=request.url.scheme == "https")
        return resp

    @app.get("/logout", include_in_schema=False)
    def logout():
        resp = RedirectResponse("/", status_code=303)
        resp.delete_cookie(LABELER_COOKIE)
        return resp

    @app.get("/task", response_class=HTMLResponse, include_in_schema=False)
    def task_page(request: Request):
        who = page_labeler(request)
        if who is None:
            return sign_in_first()
        tasks = store.next_tasks(who, 1)
        if not tasks:
            return labeler_page("message.html", who, heading="All done", text="There is nothing left for you to label in this project. Thank you!",
                                link=("/mine", "Review my labels"))
        return task_response(who, tasks[0], next_url="/task")

    @app.get("/task/{item_id}", response_class=HTMLResponse, include_in_schema=False)
    def task_edit_page(item_id: ItemPath, request: Request):
        who = page_labeler(request)
        if who is None:
            return sign_in_first()
        return task_response(who, store.task(who, item_id), next_url="/mine")

    def task_response(who: LabelerInfo, task, next_url: str) -> HTMLResponse:
        template = "task_ranking.html" if task.kind == "ranking" else "task_pairwise.html"
        return labeler_page(template, who, task=task, next_url=next_url)

    @app.get("/mine", response_class=HTMLResponse, include_in_schema=False)
    def mine_page(request: Request):
        who = page_labeler(request)
        if who is None:
            return sign_in_first()
        return labeler_page("mine.html", who, labels=store.my_labels(who))

    @app.get("/guidelines", response_class=HTMLResponse, include_in_schema=False)
    def guidelines_page(request: Request):
        return HTMLResponse(render("guidelines.html", guidelines_html=guidelines_html(guidelines_for(page_labeler(request)))))

    # -- admin pages -----------------------------------------------------

    @app.get("/admin", response_class=HTMLResponse, include_in_schema=False)
    def admin_page(request: Request):
        if not page_admin(request):
            return HTMLResponse(render("admin_login.html", error=None))
        projects = [store.project_summary(n) for n in store.project_names()]
        return HTMLResponse(render("admin.html", projects=projects))

    @app.post("/admin/login", include_in_schema=False)
    def admin_login(request: Request, token: Annotated[str, Form(max_length=500)]):
        _check_origin(request)
        if not hmac.compare_digest(token.strip().encode(), admin_token.encode()):
            return HTMLResponse(render("admin_login.html", error="That is not the admin token."), status_code=401)
        resp = RedirectResponse("/admin", status_code=303)
        resp.set_cookie(ADMIN_COOKIE, admin_token, httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return resp

    @app.get("/admin/logout", include_in_schema=False)
    def admin_logout():
        resp = RedirectResponse("/admin", status_code=303)
        resp.delete_cookie(ADMIN_COOKIE)
        return resp

    @app.get("/admin/projects/{name}", response_class=HTMLResponse, include_in_schema=False)
    def admin_project_page(name: str, request: Request):
        if not page_admin(request):
            return RedirectResponse("/admin", status_code=303)
        summary, files = build_export(store, name)
        p = store.project_summary(name)
        return HTMLResponse(render("admin_project.html", p=p, agreement=summary["agreement"], export_files=sorted(files)))

    return app
