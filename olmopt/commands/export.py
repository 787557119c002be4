"""``olmopt export best`` and ``olmopt rebuild``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from olmopt.commands._common import add_storage_flag, examples, print_json, show_bars


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export", help="write a campaign's merged model as a Hugging Face directory"
    )
    sub = export.add_subparsers(dest="export_command", metavar="WHAT", required=True)
    best = sub.add_parser(
        "best",
        help="the campaign's winning Recipe (or --trial N)",
        **examples(
            "olmopt export best zoo-tiny --out storage/merged-zoo-tiny",
            "olmopt export best zoo --stage 001-joint-layers --trial 7 --out /tmp/t7 --no-compare",
        ),
    )
    best.add_argument("name", metavar="NAME", help="campaign name (see `olmopt study list`)")
    best.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="model directory to write (must not exist unless --force)",
    )
    best.add_argument(
        "--trial", type=int, metavar="N", help="export trial N of the last stage (or of --stage)"
    )
    best.add_argument("--stage", metavar="KEY", help="stage key as shown by `olmopt study status`")
    best.add_argument("--force", action="store_true", help="replace an existing output directory")
    best.add_argument("--no-compare", action="store_true", help="skip scoring every donor for the model card")
    best.add_argument("--refine", choices=["es"], help="first refine the winner's units by ES (docs/es.md)")
    best.add_argument("--es-unit", action="append", metavar="UNIT", help="with --refine es: refine UNIT")
    best.add_argument("--json", action="store_true", help="print the result as JSON (see docs/monitoring.md)")
    best.add_argument(
        "--mergekit-config",
        type=Path,
        metavar="FILE",
        help="also write the winner as a mergekit YAML (exit 1 when mergekit cannot express it)",
    )
    best.add_argument("--quiet", action="store_true", help="no progress bars")
    add_storage_flag(best)
    best.set_defaults(func=cmd_export_best)

    rebuild = subparsers.add_parser(
        "rebuild",
        help="rebuild a model from a merge_report.json alone",
        **examples(
            "olmopt rebuild storage/merged-zoo-tiny/merge_report.json --out /tmp/again --models-dir "
            "storage/zoo-tiny"
        ),
    )
    rebuild.add_argument("report", type=Path, metavar="REPORT.json")
    rebuild.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="model directory to write (must not exist unless --force)",
    )
    rebuild.add_argument(
        "--models-dir", type=Path, metavar="DIR",
        help="where the report's local models are (NAME -> DIR/NAME; OLM's org/name -> DIR/org_name)",
    )  # fmt: skip
    rebuild.add_argument("--force", action="store_true", help="replace an existing output directory")
    rebuild.add_argument("--json", action="store_true", help="print {out, recipe} as JSON")
    rebuild.add_argument("--quiet", action="store_true", help="no progress bars")
    rebuild.set_defaults(func=cmd_rebuild)


def cmd_export_best(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.force:  # before the seconds of imports and loading below
        from olmopt.errors import InputError

        raise InputError(f"output {args.out} already exists (pass --force to replace it)")
    from olmopt.search.finalize import export_best
    from olmopt.search.storage import storage_url

    mergekit = args.mergekit_config
    if mergekit is not None and mergekit.exists() and not args.force:
        from olmopt.errors import InputError

        raise InputError(f"--mergekit-config {mergekit} already exists (pass --force to replace it)")
    result = export_best(
        args.name, storage_url(args.storage), args.out, args.trial, args.stage, args.force,
        progress=show_bars(args.quiet), compare_donors=not args.no_compare,
        refine=args.refine, es_units=args.es_unit,
    )  # fmt: skip
    status = 0
    if mergekit is not None:
        status = _write_mergekit(result, args.out, mergekit)
    if args.json:
        print_json(result)
        return status
    print(f"exported {args.name} ({result['stage']}, trial {result['trial']}) to {args.out}")
    names = list(result["metrics"])
    print(f"{'model':<44} " + " ".join(f"{n[:12]:>12} {'(held)':>8}" for n in names))
    for row in result["comparison"]:
        cells = " ".join(
            f"{row['search'].get(n, float('nan')):>12.4f} {row['held_out'].get(n, float('nan')):>8.4f}"
            for n in names
        )
        print(f"{row['model'][-44:]:<44} {cells}")
    if "refine" in result:
        r = result["refine"]
        steps, stages = len(r["steps"]), len(r["stages"])
        print(f"ES refinement: {steps} accepted steps in {stages} stages (before: {r['before']['stage']})")
    verdict = result.get("held_out_copeland")
    if verdict:
        for line in verdict_lines(result["comparison"][0]["model"], verdict):
            print(line)
    return status


def _write_mergekit(result: dict, out: Path, path: Path) -> int:
    """Write the winner's mergekit YAML; 1 (and why, on stderr) when mergekit cannot express it."""
    import sys

    from olmopt.mergekit import NotExpressible, write_mergekit_config
    from olmopt.recipe import Recipe

    try:
        write_mergekit_config(Recipe.from_dict(result["recipe"]), out, path)
    except NotExpressible as exc:
        result["mergekit_config"] = None
        print(
            f"olmopt: model exported to {out}; mergekit config NOT written: mergekit cannot express this "
            f"Recipe: {exc}",
            file=sys.stderr,
        )
        return 1
    result["mergekit_config"] = str(path)
    return 0


def verdict_lines(merged: str, verdict: dict[str, Any]) -> list[str]:
    """What export says about the merge against the single models: means first, then Copeland."""
    lines = []
    means = verdict.get("means") or {}
    if means.get(merged):
        cells = [f"{m.rsplit('/', 1)[-1]} {v[0]:.3f} ± {v[1]:.3f}" for m, v in means.items() if v]
        lines.append("held-out mean (95% interval): " + "; ".join(cells))
    scores = verdict["scores"]
    line = f"held-out Copeland: merged {scores[merged]:g} of {len(scores) - 1}"
    if verdict["merged_is_sole_winner"]:
        line += "; the merged model beats the base and every single donor on Copeland"
    else:
        line += "; the merged model is NOT the sole Copeland winner"
    lines.append(line)
    if verdict.get("draws"):
        lines.append("draws (as many held-out objectives won as lost) with: " + ", ".join(verdict["draws"]))
    if verdict.get("higher_mean"):
        lines.append("a higher held-out mean than the merge's: " + ", ".join(verdict["higher_mean"]))
    return lines


def cmd_rebuild(args: argparse.Namespace) -> int:
    from olmopt.export import rebuild

    recipe = rebuild(args.report, args.out, args.models_dir, args.force, progress=show_bars(args.quiet))
    if args.json:
        print_json({"out": str(args.out), "recipe": recipe.to_dict()})
    else:
        print(f"rebuilt {args.out} from {args.report}")
    return 0
