"""``alignkit label ...``: run the feedback app and manage its projects.

    alignkit label serve [--db URL] [--host 127.0.0.1] [--port 8765]
    alignkit label create-project --file completions.jsonl --kind ranking --name round1 --overlap 3
    alignkit label invite --project round1 --labeler alice        # prints alice's link
    alignkit label status
    alignkit label export --project round1 --out runs/feedback/round1

Every command but ``serve`` works on the database directly, so it also works
while the server runs. The admin token comes from ALIGNKIT_ADMIN_TOKEN, or
``serve`` makes one up and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from alignkit.errors import AlignkitError
from alignkit.feedback.config import DEFAULT_DB_URL, LabelConfig


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=DEFAULT_DB_URL, help=f"database URL (default {DEFAULT_DB_URL}; or postgresql+psycopg://...)")

    parser = argparse.ArgumentParser(prog="alignkit label", description="The human-feedback web app: labeling, human evaluation, agreement, export.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="start the web app")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--guidelines", help="Markdown file shown to labelers (default: alignkit's own)")
    serve.add_argument("--base-url", help="how labelers reach the server, for invite links (default http://HOST:PORT)")
    serve.add_argument("--max-request-bytes", type=int, default=LabelConfig.max_request_bytes)
    serve.add_argument("--max-upload-bytes", type=int, default=LabelConfig.max_upload_bytes)

    create = sub.add_parser("create-project", parents=[common], help="create a project from a JSONL file")
    create.add_argument("--file", required=True, help="completions (alignkit generate / label-ai) or two models' outputs (alignkit eval)")
    create.add_argument("--kind", required=True, choices=["ranking", "pairwise"])
    create.add_argument("--name", required=True)
    create.add_argument("--overlap", type=int, default=3, help="labelers per item (default 3)")
    create.add_argument("--guidelines", help="Markdown guidelines for this project (default: the server's)")

    invite = sub.add_parser("invite", parents=[common], help="create a labeler's link (inviting again replaces it)")
    invite.add_argument("--project", required=True)
    invite.add_argument("--labeler", required=True)
    invite.add_argument("--base-url", default=None, help="server address in the link (default http://127.0.0.1:8765)")

    export = sub.add_parser("export", parents=[common], help="write preferences / rankings / win-tie-loss files")
    export.add_argument("--project", required=True)
    export.add_argument("--out", required=True, help="output directory")

    sub.add_parser("status", parents=[common], help="projects, progress and agreement")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["label"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        _check_text(args)
        return _COMMANDS[args.command](args)
    except AlignkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def cli(argv: list[str], stage: str = "label") -> int:
    """Entry point for ``alignkit label ...`` (the main CLI passes the arguments after "label")."""
    return main(argv)


PATH_ARGS = ("file", "guidelines", "out")  # the file system takes any bytes; everything else is stored or sent as UTF-8


def _check_text(args) -> None:
    """Names (a project, a labeler), URLs and hosts must be text UTF-8 can encode: an argument that is
    not (bytes the locale cannot decode arrive as lone surrogates) is refused before the database sees it."""
    from alignkit.web import unencodable

    where = unencodable({k: v for k, v in vars(args).items() if k not in PATH_ARGS})
    if where is not None:
        raise AlignkitError(f"--{where.replace('_', '-')}: not valid text (it holds bytes that are not UTF-8)")


def _store(args):
    from alignkit.feedback.storage import Store

    return Store(args.db)


def cmd_serve(args) -> int:
    import uvicorn

    from alignkit.feedback.server import create_app
    from alignkit.feedback.storage import shown_url

    config = LabelConfig(
        db_url=args.db, host=args.host, port=args.port, guidelines=args.guidelines, base_url=args.base_url,
        max_request_bytes=args.max_request_bytes, max_upload_bytes=args.max_upload_bytes,
    )
    token, generated = config.resolve_admin_token()
    app = create_app(config)
    print(f"alignkit feedback on {config.public_url()}  (database {shown_url(args.db)})", flush=True)
    if generated:
        print(f"admin token (set ALIGNKIT_ADMIN_TOKEN to choose one): {token}", flush=True)
    print(f"admin page: {config.public_url()}/admin", flush=True)
    # One process on purpose: SQLite has one writer, and labels are committed
    # before each response, so more workers would only queue on the lock.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def cmd_create_project(args) -> int:
    from alignkit.feedback.items import read_project_file

    guidelines = None
    if args.guidelines:
        guidelines = LabelConfig(guidelines=args.guidelines).guidelines_text()
    pf = read_project_file(args.file, args.kind)
    store = _store(args)
    try:
        # The file's name is stored as text: bytes that are not UTF-8 are shown as U+FFFD.
        source = os.fsencode(args.file).decode("utf-8", "replace")
        summary = store.create_project(args.name, pf, args.overlap, source=source, guidelines=guidelines)
    finally:
        store.close()
    extra = f", models {summary.model_a} vs {summary.model_b} (hidden from labelers)" if summary.kind == "pairwise" else ""
    print(f"created project {summary.name!r}: {summary.n_items} {summary.kind} items, {summary.overlap} labelers per item{extra}")
    return 0


def cmd_invite(args) -> int:
    store = _store(args)
    try:
        token = store.invite(args.project, args.labeler)
    finally:
        store.close()
    base = (args.base_url or LabelConfig().public_url()).rstrip("/")
    print(f"{base}/l/{token}")
    return 0


def cmd_export(args) -> int:
    from alignkit.feedback.export import export_project

    store = _store(args)
    try:
        summary = export_project(store, args.project, args.out)
    finally:
        store.close()
    print(json.dumps(summary, indent=2))
    return 0


def cmd_status(args) -> int:
    from alignkit.feedback.agreement import project_agreement

    store = _store(args)
    try:
        names = store.project_names()
        if not names:
            print("no projects yet (alignkit label create-project ...)")
        for name in names:
            s = store.project_summary(name)
            project, records = store.project_records(name)
            agreement = project_agreement(project.kind, [r for r in records if r.labels])
            slots = max(1, s.n_items * s.overlap)
            print(f"{s.name} ({s.kind}): {s.n_items} items x {s.overlap} labelers, {s.n_labels} labels ({100 * s.n_labels / slots:.1f}%), "
                  f"{s.n_items_complete} items complete, {s.n_labelers} labelers")
            print("  agreement: " + ", ".join(f"{k}={v}" for k, v in agreement.items()))
    finally:
        store.close()
    return 0


_COMMANDS = {
    "serve": cmd_serve,
    "create-project": cmd_create_project,
    "invite": cmd_invite,
    "export": cmd_export,
    "status": cmd_status,
}

if __name__ == "__main__":
    sys.exit(main())
