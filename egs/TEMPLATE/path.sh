# Sourced by run.sh and by every job: the toolkit's Python environment (tools/install.sh made it).
MAIN_ROOT=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)  # through the recipe's symlink
if [ ! -x "$MAIN_ROOT/tools/venv/bin/python" ]; then
  echo "path.sh: $MAIN_ROOT/tools/venv is missing: run tools/install.sh first" >&2
  return 1 2>/dev/null || exit 1
fi
# shellcheck disable=SC1091
. "$MAIN_ROOT/tools/venv/bin/activate"
export OMP_NUM_THREADS=1          # one thread per process: jobs run in parallel (2 cores: 45 us vs 6 ms per matmul)
export PYTHONUNBUFFERED=1         # logs appear as they are written
export LC_ALL=C                   # Kaldi data dirs are sorted in C-locale order
