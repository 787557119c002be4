"""``olmopt dashboard``: optuna-dashboard over the campaign storage, with the artifact store, on loopback."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
import warnings
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from olmopt.commands._common import add_storage_flag, sigterm_as_interrupt

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
        help="artifact store (default: $OLMOPT_ARTIFACT_DIR, else artifacts/ beside a SQLite file, else ./storage/artifacts)",
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


def make_dashboard_server(url: str, host: str, port: int, artifact_dir: Path) -> WSGIServer:
    """A threaded WSGI server running optuna-dashboard on ``url`` (not yet serving)."""
    import optuna_dashboard

    from olmopt.errors import InputError
    from olmopt.search.annotate import artifact_store
    from olmopt.search.storage import open_storage, redact

    storage = open_storage(url, heartbeat=False, create=False)
    app = optuna_dashboard.wsgi(storage, artifact_store=artifact_store(artifact_dir))
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
