#!/usr/bin/env bash
# Kaldi-style job launcher, local backend: utils/run.sh [options] JOB=1:N log/x.JOB.log command ...  (--help for more)
# Works through a recipe's utils -> ../../utils symlink: the repository root is found from this file's real path.
root=$(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")
PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH} exec python3 -m pqm_ext.launch.local "$@"
