"""``olmopt report NAME --out DIR``: an HTML page with PNG plots about one campaign."""

from __future__ import annotations

import argparse
from pathlib import Path

from olmopt.commands._common import add_storage_flag, examples, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write an HTML report (donor map, metrics per stage, Pareto fronts) of a campaign",
        description=(
            "Write DIR/index.html with PNG plots beside it: the donor map of the final Recipe, every "
            "objective across stages (search and held-out), which differences each stage's decision found "
            "significant, the Pareto front of each joint stage with the selected trial marked, and ES "
            "progress. Works on unfinished campaigns too."
        ),
        **examples(
            "olmopt report zoo-tiny --out /tmp/zoo-tiny-report", "olmopt report zoo --out report --embed"
        ),
    )
    parser.add_argument("name", metavar="NAME", help="campaign name (see `olmopt study list`)")
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="output directory (created; files in it are replaced)",
    )
    add_storage_flag(parser)
    parser.add_argument(
        "--embed", action="store_true", help="also embed the PNGs in index.html (one file to share)"
    )
    parser.add_argument("--json", action="store_true", help="print the written paths as JSON")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    parser.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from olmopt.errors import InputError
    from olmopt.report import write_report
    from olmopt.search.annotate import campaign_report_data
    from olmopt.search.storage import storage_url

    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} exists and is not a directory")
    data = campaign_report_data(args.name, storage_url(args.storage))
    result = write_report(data, args.out, embed=args.embed)
    if args.json:
        print_json({"name": args.name, "finished": data["finished"], **result})
    elif not args.quiet:
        print(f"report of {args.name} written to {result['index']} ({len(result['plots'])} plots)")
    return 0
