#!/usr/bin/env bash
# The test command: set up everything (tools/install.sh, idempotent) and run the whole test suite.
# The Slurm tests start a real single-node Slurm (tools/local_slurm.sh) when run as root, the way CI
# runs; elsewhere they are skipped with their reason (set PQM_TEST_SLURM=1 to force them).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install.sh
if [ -z "${PQM_TEST_SLURM:-}" ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  export PQM_TEST_SLURM=1
fi
export OMP_NUM_THREADS=1
exec tools/venv/bin/python -m pytest -q -rs --durations=15 "$@"  # the 15 slowest tests: where CI time goes
