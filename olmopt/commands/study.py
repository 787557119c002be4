"""``olmopt study create|run|status|list``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from olmopt.commands._common import add_storage_flag, examples, print_json, show_bars, sigterm_as_interrupt


def register(subparsers: argparse._SubParsersAction) -> None:
    study = subparsers.add_parser("study", help="create, run and inspect merge campaigns")
    sub = study.add_subparsers(dest="study_command", metavar="ACTION", required=True)

    create = sub.add_parser(
        "create",
        help="validate a study file and create its campaign",
        **examples(
            "olmopt study create studies/zoo-tiny.yaml",
            "olmopt study create studies/zoo.yaml --name zoo-2 --storage postgresql+psycopg://me@db/olmopt",
        ),
    )
    create.add_argument("study_file", metavar="STUDY.yaml")
    create.add_argument("--name", help="campaign name (default: the study file's `name`)")
    add_storage_flag(create, study_file=True)
    create.add_argument("--json", action="store_true", help="print the plan as JSON")
    create.set_defaults(func=cmd_create)

    run = sub.add_parser(
        "run",
        help="run (or resume) a campaign's stages",
        **examples(
            "olmopt study run zoo-tiny",
            "olmopt study run zoo --workers 2 --timeout 3600 2> run.log   # timestamped stage lines in "
            "run.log",
        ),
    )
    run.add_argument("name", metavar="NAME", help="campaign name (see `olmopt study list`)")
    add_storage_flag(run)
    run.add_argument(
        "--workers", type=int, default=1, metavar="K", help="evaluate K candidates at once (processes)"
    )
    run.add_argument(
        "--n-trials", type=int, metavar="N", help="trial budget of joint stages (overrides the study)"
    )
    run.add_argument("--timeout", type=float, metavar="S", help="stop after S seconds (resume later)")
    run.add_argument(
        "--quiet", action="store_true", help="no progress bars (the timestamped line per stage stays)"
    )
    run.set_defaults(func=cmd_run)

    status = sub.add_parser(
        "status",
        help="stages, trials, winners and metrics of a campaign",
        **examples("olmopt study status zoo-tiny", "olmopt study status zoo-tiny --json | jq .state"),
    )
    status.add_argument("name", metavar="NAME", help="campaign name (see `olmopt study list`)")
    add_storage_flag(status)
    status.add_argument(
        "--json", action="store_true", help="print the status as JSON (see docs/monitoring.md)"
    )
    status.set_defaults(func=cmd_status)

    delete = sub.add_parser(
        "delete",
        help="delete a campaign (its record, stages and trials) from a storage",
        description=(
            "Delete campaign NAME: its root study, every stage study and their trials. Refused while a "
            "worker runs it (SQLite: another olmopt process holds the file; shared storages: a stage lock or "
            "a running trial that still beats). Asks for confirmation on a terminal; --yes skips it (needed "
            "in scripts). Re-create a campaign by deleting it and running `study create` again."
        ),
        **examples(
            "olmopt study delete zoo-tiny", "olmopt study delete zoo-tiny --yes --storage sqlite:///other.db"
        ),
    )
    delete.add_argument("name", metavar="NAME", help="campaign name (see `olmopt study list`)")
    add_storage_flag(delete)
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    delete.set_defaults(func=cmd_delete)

    lst = sub.add_parser(
        "list", help="campaigns in a storage", **examples("olmopt study list", "olmopt study list --json")
    )
    add_storage_flag(lst)
    lst.add_argument("--json", action="store_true", help="print the campaigns as a JSON list")
    lst.set_defaults(func=cmd_list)


def cmd_create(args: argparse.Namespace) -> int:
    from olmopt.config import load_study_file
    from olmopt.errors import StudyKeyError
    from olmopt.search.api import create_campaign
    from olmopt.search.kinds import get_kind
    from olmopt.search.storage import redact, resolve_storage

    config = load_study_file(args.study_file)
    if args.name:
        config = config.model_copy(update={"name": args.name})
    url, source = resolve_storage(args.storage, config.storage)
    try:
        campaign = create_campaign(config, url)
    except StudyKeyError as exc:  # a key refused against the pool or the machine: the file's name first
        raise StudyKeyError(f"{args.study_file}: {exc}") from None
    from olmopt.search.advice import sampler_warnings

    for warning in sampler_warnings(config, campaign.plan):
        print(f"olmopt: warning: {warning}", file=sys.stderr)
    if args.json:
        print_json(
            {
                "name": campaign.name,
                "storage": redact(url),
                "stages": [s.to_dict() | {"key": s.key} for s in campaign.plan],
            }
        )
        return 0
    print(f"created campaign {campaign.name!r} in {redact(url)} with {len(campaign.plan)} stages:")
    for stage in campaign.plan:
        extra = f" ({stage.n_trials} trials)" if get_kind(stage.kind).joint else ""
        print(f"  {stage.key}{extra}")
    # every later command reads --storage, $OLMOPT_STORAGE or
    # the default, never the study file: say where it lives
    where = f" --storage {redact(url)}" if source in ("--storage", "the study file") else ""
    print(f"next: olmopt study run {campaign.name}{where}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from olmopt.search.api import run_campaign
    from olmopt.search.storage import storage_url

    if args.workers < 1:
        from olmopt.errors import InputError

        raise InputError("--workers must be >= 1")
    sigterm_as_interrupt()
    # bars only on a terminal: redirected output gets plain lines, no carriage-return frames or colours
    bars = show_bars(args.quiet)
    outcome = run_campaign(
        args.name,
        storage_url(args.storage),
        args.workers,
        args.n_trials,
        args.timeout,
        bars,
        stage_logger(bars),
    )
    state = "finished" if outcome.finished else "stopped (resume with the same command)"
    print(
        f"campaign {args.name}: {state}; {outcome.stages_run} stages and {outcome.trials_run} trials this run"
    )
    if outcome.final is not None and outcome.finished:
        print(f"recipe: {outcome.final.to_json()}")
    return 0 if outcome.finished else 3


def stage_logger(bars: bool) -> Callable[[str], None]:
    """One timestamped line per message on stderr (above the bars when there are bars)."""

    def log(message: str) -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {message}"
        if bars:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    return log


def cmd_status(args: argparse.Namespace) -> int:
    from olmopt.search.api import campaign_status
    from olmopt.search.storage import storage_url

    status = campaign_status(args.name, storage_url(args.storage))
    if args.json:
        print_json(status)
        return 0
    names = list(status["objectives"])
    stages = status["stages"]
    decided = sum(s["state"] == "decided" for s in stages)
    error = f": {status['error']}" if status.get("error") else ""
    print(f"campaign {status['name']}: {status['state']}{error} ({decided} of {len(stages)} stages decided)")
    short = status["pool"]
    winners = [short.get(s["winner"], s["winner"]) if s["winner"] else "-" for s in stages]
    ws = max([len("stage"), *(len(s["stage"]) for s in stages)])  # nothing is cut: columns fit their cells
    ww = max([len("winner"), *(len(w) for w in winners)])
    mw = max([10, *(len(n) for n in names)])
    print(
        f"{'stage':<{ws}}  {'state':<8} {'trials':>6}  {'winner':<{ww}}  "
        + " ".join(f"{n:>{mw}}" for n in names)
    )
    for s, winner in zip(stages, winners, strict=True):
        metrics = s["metrics"] or {}
        vals = " ".join(f"{metrics[n]:>{mw}.4f}" if n in metrics else f"{'-':>{mw}}" for n in names)
        print(f"{s['stage']:<{ws}}  {s['state']:<8} {s['trials']['complete']:>6}  {winner:<{ww}}  {vals}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from olmopt.search.campaign import list_campaigns
    from olmopt.search.storage import storage_url

    rows = list_campaigns(storage_url(args.storage))
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no campaigns")
    width = max(len(r["name"]) for r in rows) if rows else 0
    for r in rows:
        print(
            f"{r['name']:<{width}}  {r['decided']:>4}/{r['stages']:<4} stages  {r['state']:<11}  created "
            f"{r['created']}"
        )
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from olmopt.errors import InputError, StorageError
    from olmopt.search.campaign import Campaign, delete_campaign, live_work
    from olmopt.search.storage import is_sqlite, redact, single_writer, stale_after, storage_url

    url = storage_url(args.storage)
    campaign = Campaign.load(args.name, url)  # nothing there: one line, exit 2
    decided = len(campaign.decisions())
    what = f"campaign {args.name!r} ({len(campaign.plan)} stages, {decided} decided) from {redact(url)}"
    if not args.yes:
        if not sys.stdin.isatty():
            raise InputError(f"not deleting {what}: no terminal to confirm on; add --yes")
        if input(f"delete {what}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    with single_writer(url):  # SQLite: refused while another olmopt process has the file, and none starts now
        if not is_sqlite(url):
            busy = live_work(campaign, stale_after())
            if busy:
                raise StorageError(
                    f"not deleting campaign {args.name!r}: a worker is running it ({'; '.join(busy)}); stop "
                    "it first"
                )
        n = delete_campaign(campaign.storage, args.name)
    print(f"deleted {what} ({n} studies)")
    return 0
