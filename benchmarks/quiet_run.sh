#!/bin/bash
# The benchmarks of this session, run back to back on an otherwise idle machine (see reports/benchmarks/README.md).
#   bash benchmarks/quiet_run.sh
set -e
cd "$(dirname "$0")/.."
python -m benchmarks.quantizers --sections train --quantizers lsq,lsq_plus,dsq,apot,ewgs,n2uq,tqt,dorefa --rounds 10 \
    --no-compile --threads 2 --out reports/benchmarks/zoo-train
python -m benchmarks.dynamics --every 50 --rounds 10 --out reports/benchmarks/dynamics
python -m benchmarks.torch_ao --out reports/benchmarks/torch-ao
python -m benchmarks.whole_job --rounds 2 --warmup 0 --compare --out reports/benchmarks/whole-job
