#!/usr/bin/env bash
# One command for a GPU machine (under 8 minutes on one H200): the stage benchmark at the
# published shapes with AMP off and on, then every stage's step with a random ViT-B/8 backbone on
# generated COCO-sized batches, with and without torch.compile on the heads. Markdown tables on stdout.
#
#   bash benchmarks/gpu_check.sh            # on a GPU machine
#   bash benchmarks/gpu_check.sh --dry_run  # seconds on a CPU: the same commands at a tiny scale
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh

if [ "${1:-}" = "--dry_run" ]; then
  bench=(--device cpu --scale 0.02 --repeats 1 --stages 1 2 3)
  stages=(--dry_run --compile)
else
  bench=(--device cuda --literal_concepts 2048 --repeats 5 --stages 1 2 3)
  stages=(--device cuda --steps 200 --compile)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

echo; echo "## bench_stages, AMP off"
"$PY" benchmarks/bench_stages.py "${bench[@]}"
echo; echo "## bench_stages, AMP on (project and floor only)"
"$PY" benchmarks/bench_stages.py "${bench[@]}" --amp --no_literal
echo; echo "## stage steps, AMP off"
"$PY" benchmarks/gpu_stages.py "${stages[@]}"
echo; echo "## stage steps, AMP on"
"$PY" benchmarks/gpu_stages.py "${stages[@]}" --amp
