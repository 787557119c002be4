#!/usr/bin/env bash
# The main job on the embedded default storage (SQLite under storage/) and the small offline zoo:
# build the zoo, create and run the campaign, export the winner, print base/donors/merged side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
OLMOPT=".venv/bin/olmopt"
NAME="${OLMOPT_DEMO_NAME:-zoo}"
OUT="storage/merged-${NAME}"

$OLMOPT zoo build --out storage/zoo-small --size small --refresh  # an outdated zoo there is rebuilt
if ! $OLMOPT study status "$NAME" >/dev/null 2>&1; then
  $OLMOPT study create studies/zoo.yaml --name "$NAME"
fi
$OLMOPT study run "$NAME"
$OLMOPT export best "$NAME" --out "$OUT" --force
echo "merged model: $OUT (model card: $OUT/README.md, report: $OUT/merge_report.json)"
