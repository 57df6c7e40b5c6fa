#!/usr/bin/env bash
# Commit the finished cells of a comparison grid (those with metrics.json) and its tables, never a cell in progress,
# so a grid that outlives the machine resumes from a fresh clone: `quantbench compare --config ... --out DIR` then
# trains only what is missing. Usage: bash experiments/commit-finished.sh reports/powered ["message"]
set -euo pipefail
dir=${1:?usage: commit-finished.sh DIR [message]}
added=0
for cell in "$dir"/fp/* "$dir"/runs/*; do
  if [ -f "$cell/metrics.json" ]; then git add "$cell"; added=$((added + 1)); fi
done
for file in results.csv compare.json report.md paired_differences.csv design.md accuracy_vs_bits.png \
            accuracy_vs_model_size.png; do
  if [ -f "$dir/$file" ]; then git add "$dir/$file"; fi
done
for folder in pilot dynamics; do
  if [ -d "$dir/$folder" ]; then git add "$dir/$folder"; fi
done
git commit -q -m "${2:-$dir: $added finished cells}" && echo "committed $added finished cells of $dir"
