# Where jobs run: the only place a recipe chooses the backend (sourced by run.sh).
# Every launcher has Kaldi's interface: ${train_cmd} [--mem 4G --num_threads K ...] JOB=1:N log/x.JOB.log cmd ...
# Stages add --gpu N to ${cuda_cmd} themselves (as in ESPnet). Pick the backend with PQM_CMD_BACKEND:
#   local   run on this machine, all jobs at once unless --max_jobs_run P (default); with --gpu N and GPUs
#           visible, one job per N GPUs at a time (--jobs_per_gpu J: J jobs)
#   slurm   one sbatch --array per call; flags from conf/slurm.conf (tools/local_slurm.sh starts a test Slurm)
#   stdout  one job after another, output also on the terminal (debugging)
cmd_backend=${PQM_CMD_BACKEND:-local}

case "$cmd_backend" in
  local)
    train_cmd="utils/run.sh"
    decode_cmd="utils/run.sh"
    cuda_cmd="utils/run.sh"
    ;;
  slurm)
    train_cmd="utils/slurm.sh --config conf/slurm.conf"
    decode_cmd="utils/slurm.sh --config conf/slurm.conf"
    cuda_cmd="utils/slurm.sh --config conf/slurm.conf"
    ;;
  stdout)
    train_cmd="utils/stdout.sh"
    decode_cmd="utils/stdout.sh"
    cuda_cmd="utils/stdout.sh"
    ;;
  *)
    echo "cmd.sh: unknown backend PQM_CMD_BACKEND=$cmd_backend (expected local, slurm or stdout)" >&2
    return 1 2>/dev/null || exit 1
    ;;
esac
export train_cmd decode_cmd cuda_cmd
