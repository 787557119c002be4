"""``olmopt dashboard``: optuna-dashboard over the campaign storage, with the artifact store, on loopback."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
import threading
import warnings
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from olmopt.commands._common import add_storage_flag, examples, sigterm_as_interrupt

DEFAULT_PORT = 8080
NO_AUTH_FLAG = "--i-know-there-is-no-auth"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dashboard",
        help="serve optuna-dashboard on a campaign storage (127.0.0.1 only by default)",
        description=(
            "Serve optuna-dashboard over the campaign storage with olmopt's artifact store (trial Recipes, "
            "stage summaries, exported merge reports). The dashboard has no authentication: it binds "
            f"127.0.0.1 unless {NO_AUTH_FLAG} is given; reach it remotely through an SSH tunnel. "
            "Stop it with Ctrl-C or SIGTERM."
        ),
        **examples(
            "olmopt dashboard", "olmopt dashboard --storage postgresql+psycopg://me@db/olmopt --port 8081"
        ),
    )
    add_storage_flag(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        metavar="P",
        help=f"port (default {DEFAULT_PORT}; 0 picks a free one)",
    )
    parser.add_argument(
        "--artifact-dir",
        type=Path,
        metavar="DIR",
        help="artifact store (default: $OLMOPT_ARTIFACT_DIR, else artifacts/ beside a SQLite file, else "
        "./storage/artifacts)",
    )
    parser.add_argument(
        NO_AUTH_FLAG, dest="no_auth_ok", action="store_true", help="allow a non-loopback --host"
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.set_defaults(func=cmd_dashboard)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        logging.getLogger("olmopt.dashboard").debug(format, *args)


def mark_selected_trials() -> None:
    """Make optuna-dashboard's "Best Trial" the trial olmopt selected, on decided stages.

    For a multi-objective study the dashboard marks every trial of the Pareto front (computed without
    constraints) as "Best Trial": on a greedy stage that is often every candidate, and olmopt's winner
    (Copeland over the feasible front) is not told apart. In this process, a study whose user attrs hold
    olmopt's decision gets its winning trial as its only best trial (badge, "Best Trial (number=N)" card,
    highlighted point); other studies keep the dashboard's front. Wraps two names in
    ``optuna_dashboard._app`` (0.21); the study detail handler calls ``get_study`` and then
    ``get_pareto_front_trials`` in the same thread."""
    from optuna.trial import TrialState
    from optuna_dashboard import _app

    from olmopt.search.campaign import decision_in

    if getattr(_app, "_olmopt_marks_selected", False):
        return
    seen = threading.local()
    get_study, pareto_front = _app.get_study, _app.get_pareto_front_trials

    def get_study_noting_decision(storage: Any, study_id: int) -> Any:
        study = get_study(storage, study_id)
        seen.decision = decision_in(study.user_attrs) if study is not None else None
        return study

    def selected_or_front(trials: Any, directions: Any) -> Any:
        decision, seen.decision = getattr(seen, "decision", None), None
        if decision is not None and decision.trial is not None:
            chosen = [t for t in trials if t.number == decision.trial and t.state == TrialState.COMPLETE]
            if chosen:
                return chosen
        return pareto_front(trials=trials, directions=directions)

    _app.get_study = get_study_noting_decision
    _app.get_pareto_front_trials = selected_or_front
    _app._olmopt_marks_selected = True


def dashboard_app(storage: Any, artifact_dir: Path) -> Any:
    """optuna-dashboard's WSGI app over ``storage`` with olmopt's artifact store and winners marked."""
    import optuna_dashboard

    from olmopt.search.annotate import artifact_store

    mark_selected_trials()
    return optuna_dashboard.wsgi(storage, artifact_store=artifact_store(artifact_dir))


def make_dashboard_server(url: str, host: str, port: int, artifact_dir: Path) -> WSGIServer:
    """A threaded WSGI server running optuna-dashboard on ``url`` (not yet serving)."""
    from olmopt.errors import InputError
    from olmopt.search.storage import open_storage, redact

    storage = open_storage(url, heartbeat=False, create=False)
    app = dashboard_app(storage, artifact_dir)
    server_class = _Server6 if ":" in host else _Server
    try:
        return make_server(host, port, app, server_class=server_class, handler_class=_Handler)
    except OSError as exc:
        raise InputError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} (for {redact(url)})"
        ) from None


def cmd_dashboard(args: argparse.Namespace) -> int:
    from olmopt.errors import InputError
    from olmopt.search.annotate import artifact_dir_for
    from olmopt.search.storage import redact, storage_url

    if not is_loopback(args.host) and not args.no_auth_ok:
        raise InputError(
            f"--host {args.host} exposes a dashboard without authentication; add {NO_AUTH_FLAG} to allow it"
        )
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port} is not a port number")
    url = storage_url(args.storage)
    artifact_dir = args.artifact_dir or artifact_dir_for(url)
    server = make_dashboard_server(url, args.host, args.port, artifact_dir)
    port = server.server_address[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    if not args.quiet:
        print(f"optuna-dashboard for {redact(url)} (artifacts: {artifact_dir})", flush=True)
        print(f"open http://{shown}:{port}/dashboard  (Ctrl-C to stop)", flush=True)
    warnings.filterwarnings(
        "ignore", category=UserWarning, module=r"optuna(_dashboard)?\."
    )  # per-request noise
    sigterm_as_interrupt()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    if not args.quiet:
        print("dashboard stopped", file=sys.stderr)
    return 0
