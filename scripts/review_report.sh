#!/usr/bin/env bash
# What a branch changed, for its reviewer: params, metrics and plots between two revisions.
#
#   scripts/review_report.sh BASE [HEAD] [OUT]
#
#   BASE  git revision to compare against (main, origin/main, HEAD~1, a tag, a commit)
#   HEAD  revision under review; omitted or "" means the workspace, uncommitted results included
#   OUT   folder to write to (default: review); files already there are overwritten
#
# Writes OUT/report.md (params and metrics tables, markdown, ready to paste into a review),
# OUT/params.md, OUT/metrics.md and OUT/plots/index.html (curves, per-class IoU bars and images
# of both revisions side by side). Needs the metrics and plots of both revisions: they are
# committed with git, so no DVC remote is needed.
set -euo pipefail

usage() {
  sed -n '4,8p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
[ $# -ge 1 ] && [ $# -le 3 ] && [ -n "$1" ] || usage
base=$1
head=${2:-}
out=${3:-review}

for rev in "$base" ${head:+"$head"}; do
  if ! git rev-parse --verify --quiet "$rev^{commit}" >/dev/null; then
    echo "review_report: '$rev' is not a git revision here" >&2
    exit 2
  fi
done
revs=("$base" ${head:+"$head"})
head_name=${head:-workspace}

mkdir -p "$out"
dvc params diff --md "${revs[@]}" >"$out/params.md"
dvc metrics diff --md "${revs[@]}" >"$out/metrics.md"
dvc plots diff "${revs[@]}" -o "$out/plots" >/dev/null

section() { # title, markdown table file, text when the table has no rows
  printf '## %s\n\n' "$1"
  # a table with rows has more than its header and separator lines
  if [ "$(grep -c '^|' "$2" || true)" -gt 2 ]; then cat "$2"; else printf '%s\n\n' "$3"; fi
}
{
  printf '# Review: %s -> %s\n\n' "$base" "$head_name"
  section "Params" "$out/params.md" "No params changed."
  section "Metrics" "$out/metrics.md" "No metrics changed."
  printf '## Plots\n\n'
  printf 'Open `plots/index.html`: curves, per-class IoU and images of %s and %s.\n' \
    "$base" "$head_name"
} >"$out/report.md"
echo "review_report: wrote $out/report.md and $out/plots/index.html"
