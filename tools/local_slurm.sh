#!/usr/bin/env bash
# A real single-node Slurm on this machine, for CI and for trying utils/slurm.sh:
#   tools/local_slurm.sh start    # install (Debian packages, once), configure, start; prints the export line
#   tools/local_slurm.sh status   # exit 0 when slurmctld and slurmd run
#   tools/local_slurm.sh stop
#   eval "$(tools/local_slurm.sh start)"   # sets SLURM_CONF in this shell
# Needs root; works without systemd. State, config, logs and PID files live in $PQM_SLURM_DIR
# (default /tmp/pqm-slurm); ports PQM_SLURMCTLD_PORT/PQM_SLURMD_PORT (6817/6818). The node "localhost"
# has this machine's CPUs and memory and one fake GPU (gres gpu:1 on /dev/null) so --gres=gpu:1 works.
set -euo pipefail

dir=${PQM_SLURM_DIR:-/tmp/pqm-slurm}
conf=$dir/slurm.conf
export SLURM_CONF=$conf

log() { echo "$(date '+%Y-%m-%d %H:%M:%S') (${BASH_SOURCE[1]##*/}:${BASH_LINENO[0]}) $*" >&2; }
die() { log "error: $*"; exit 1; }

# A PID runs if /proc has it and it is not a zombie (PID 1 here reaps killed processes late).
alive() { [ -n "$1" ] && [ -r "/proc/$1/stat" ] && [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]; }
pid_of() { if [ -s "$1" ]; then cat "$1"; fi; }
daemon_runs() {  # name pidfile: the PID in the file is alive and is that program (not a reused PID)
  local pid; pid=$(pid_of "$2")
  alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

wait_for() {  # seconds description command...: poll every 0.2 s until the command succeeds
  local t=$1 what=$2; shift 2
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || die "$what did not happen within ${t}s (logs in $dir/log)"
    sleep 0.2
  done
}

install_packages() {
  local missing=() p
  for p in slurmctld slurmd slurm-client munge; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  log "installing ${missing[*]}"
  local apt="apt-get install -y -qq --no-install-recommends ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $apt >/dev/null 2>&1 ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive $apt >/dev/null; }
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi  # already running (ours or not)
  [ -s /etc/munge/munge.key ] || {
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  }
  install -d -o munge -g munge -m 755 /run/munge
  runuser -u munge -- /usr/sbin/munged --force
  touch "$dir/run/munged.ours"
  wait_for 10 "munged start" bash -c 'munge -n | unmunge'
}

write_config() {
  local node cpus mem
  node=$(slurmd -C | head -1)
  cpus=$(grep -o 'CPUs=[0-9]*' <<<"$node" | cut -d= -f2)
  mem=$(grep -o 'RealMemory=[0-9]*' <<<"$node" | cut -d= -f2)
  cat > "$conf" <<EOF
# Written by tools/local_slurm.sh: one node "localhost" (127.0.0.1), no accounting, no cgroups.
ClusterName=pqm
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=${PQM_SLURMCTLD_PORT:-6817}
SlurmdPort=${PQM_SLURMD_PORT:-6818}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerParameters=batch_sched_delay=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  # A count-only gres line leaves the node INVAL: give the fake GPU a file.
  echo "NodeName=localhost Name=gpu File=/dev/null" > "$dir/gres.conf"
}

running() { daemon_runs slurmctld "$dir/run/slurmctld.pid" && daemon_runs slurmd "$dir/run/slurmd.pid"; }

start() {
  [ "$(id -u)" -eq 0 ] || die "needs root (slurmd runs jobs as any user)"
  if running; then
    log "already running ($dir)"
    echo "export SLURM_CONF=$conf"
    return
  fi
  local t0=$SECONDS
  stop_daemons  # a half-started earlier attempt
  install_packages
  rm -rf "$dir/state" "$dir/spool"
  mkdir -p "$dir"/{state,spool,run,log}
  start_munge
  write_config
  slurmctld
  wait_for 20 "slurmctld answering" scontrol ping
  slurmd -N localhost
  # shellcheck disable=SC2016  # expanded by the inner bash
  wait_for 30 "node localhost idle" bash -c '[ "$(sinfo -h -n localhost -o %t)" = idle ]'
  # The first batch job after slurmctld starts waits for the scheduler: pay that here, not in a test.
  # (sbatch --wait would poll after 2 s and then 8 s: poll squeue instead.)
  local job; job=$(sbatch --parsable --output=/dev/null --job-name=warm-up --wrap=true)
  wait_for 60 "warm-up job $job completed" bash -c "[ \"\$(squeue -h -t all -j $job -o %T)\" = COMPLETED ]"
  log "Slurm is up in $((SECONDS - t0)) s (config $conf, logs $dir/log)"
  echo "export SLURM_CONF=$conf"
}

stop_pid() {  # name pidfile: TERM, wait up to 10 s, then KILL
  local pid; pid=$(pid_of "$2")
  daemon_runs "$1" "$2" || { rm -f "$2"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do alive "$pid" || break; sleep 0.2; done
  if alive "$pid"; then log "$1 ($pid) ignored TERM: KILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$2"
}

stop_daemons() {
  stop_pid slurmd "$dir/run/slurmd.pid"
  stop_pid slurmctld "$dir/run/slurmctld.pid"
  if [ -e "$dir/run/munged.ours" ]; then  # only a munged this script started
    stop_pid munged /run/munge/munged.pid
    rm -f "$dir/run/munged.ours"
  fi
}

status() {
  local name file
  for name in slurmctld slurmd; do
    file=$dir/run/$name.pid
    if daemon_runs "$name" "$file"; then echo "$name: running (pid $(pid_of "$file"))"; else echo "$name: stopped"; fi
  done
  if running; then sinfo -N -o '%N %t %c %m %G'; echo "export SLURM_CONF=$conf"; else return 1; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop_daemons; log "stopped" ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status   (state in \$PQM_SLURM_DIR, default /tmp/pqm-slurm)" >&2; exit 2 ;;
esac
