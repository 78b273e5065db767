"""The slurm launcher: config mapping (always) and real array jobs against a live slurmctld (PQM_TEST_SLURM=1).

    PQM_TEST_SLURM=1 pytest -m slurm -rA tests/test_launch_slurm.py   # starts and stops tools/local_slurm.sh
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pqm_ext.launch.common import UsageError
from pqm_ext.launch.slurm import DEFAULT_CONFIG, load_config, parse_config, scheduler_flags

REPO = Path(__file__).resolve().parents[1]
TEMPLATE_CONF = REPO / "egs/TEMPLATE/conf/slurm.conf"


# ---- config mapping: no Slurm needed ----

@pytest.mark.parametrize("options, flags", [
    ({}, []),
    ({"mem": "4G"}, ["--mem", "4G"]),
    ({"mem": "0"}, []),
    ({"gpu": 0}, []),
    ({"gpu": 2, "time": "1:00:00"}, ["--gres=gpu:2", "--time", "1:00:00"]),
    ({"gpu": 1, "jobs_per_gpu": 4}, ["--gres=gpu:1"]),  # sharing a GPU is the local backend's; a task gets its own
    ({"num_threads": 1}, ["--cpus-per-task", "1"]),
    ({"num_threads": 4}, ["--cpus-per-task", "4"]),
])
def test_template_config_maps_options(options, flags):
    cfg = load_config(str(TEMPLATE_CONF))
    assert cfg.command[0] == "sbatch" and "--export=PATH" in cfg.command
    assert sorted(scheduler_flags(cfg, options)) == sorted(flags)


def test_builtin_default_matches_template():
    template = parse_config(TEMPLATE_CONF.read_text(), "t")
    default = parse_config(DEFAULT_CONFIG, "d")
    assert (template.command, template.rules, template.defaults) == (default.command, default.rules, default.defaults)


@pytest.mark.parametrize("text, message", [
    ("command sbatch\noption foo-bar=* --foo $0\n", "x.conf:2: bad option name 'foo-bar'"),
    ("command sbatch\nqueue gpu\n", "x.conf:2: unknown line type 'queue'"),
    ("option mem=* --mem $0\n", "x.conf: no 'command"),
    ("command sbatch\noption mem\n", "x.conf:2: expected"),
    ('command sbatch --comment "my job\n', "x.conf:1: No closing quotation (shell quoting)"),
])
def test_bad_config_is_an_error(tmp_path, text, message):
    (tmp_path / "x.conf").write_text(text)
    with pytest.raises(UsageError, match=re.escape(message)):
        load_config(str(tmp_path / "x.conf"))


# ESPnet's egs2/TEMPLATE/asr1/conf/slurm.conf (as shipped; its sites add partitions and accounts the same way).
ESPNET_CONF = """\
# Default configuration
command sbatch --export=PATH
option name=* --job-name $0
option time=* --time $0
option mem=* --mem-per-cpu $0
option mem=0
option num_threads=* --cpus-per-task $0
option num_threads=1 --cpus-per-task 1
option num_nodes=* --nodes $0
default gpu=0
option gpu=0 -p cpu
option gpu=* -p gpu --gres=gpu:$0 -c $0  # Recommend allocating more CPU than, or equal to the number of GPU
"""


def test_espnets_own_config_and_its_site_options_work(tmp_path):
    from pqm_ext.launch.common import parse_args

    (tmp_path / "espnet.conf").write_text(ESPNET_CONF)
    cfg = load_config(str(tmp_path / "espnet.conf"))
    req = parse_args(["--gpu", "1", "--num_nodes", "2", "--name", "dec", "JOB=1:2", "log/d.JOB.log", "true"])
    assert req.site_options == {"num_nodes": "2", "name": "dec"}
    flags = scheduler_flags(cfg, {**req.site_options, **req.options})
    assert flags == ["-p", "gpu", "--gres=gpu:1", "-c", "1", "--job-name", "dec", "--nodes", "2"]
    with pytest.raises(UsageError, match="--account x: .* has no 'option account=...' rule"):
        scheduler_flags(cfg, {"account": "x"})
    res = subprocess.run([str(REPO / "utils/run.sh"), "--num_nodes", "2", "log/a.log", "true"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=30)  # the local backend has no config: a typo
    assert res.returncode == 2 and "unknown option --num_nodes" in res.stderr


def test_option_without_rule_exits_2(tmp_path):
    (tmp_path / "x.conf").write_text("command sbatch\noption mem=* --mem $0\n")
    res = subprocess.run([str(REPO / "utils/slurm.sh"), "--config", "x.conf", "--gpu", "1", "log/a.log", "true"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "--gpu 1: x.conf has no 'option gpu=...' rule" in res.stderr


# ---- waiting for the tasks' results: a fake squeue, no Slurm needed ----

def _request(tmp_path: Path, n: int = 1):
    from pqm_ext.launch.common import Request
    from pqm_ext.launch.slurm import Paths

    req = Request(log=str(tmp_path / "log/w.JOB.log"), command="true", var="JOB", first=1, last=n)
    paths = Paths(req)
    paths.qdir.mkdir(parents=True)
    return req, paths


@pytest.fixture
def squeue_says_finished(tmp_path, monkeypatch):
    """squeue knows the job no more (every task final), as after the array ended."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\necho COMPLETED\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_a_status_written_late_on_another_host_is_waited_for(tmp_path, squeue_says_finished, monkeypatch):
    """On NFS the submit host may see a compute node's new file 30-60 s late: squeue's "finished" is not
    the end of the wait (Kaldi's slurm.pl waits too)."""
    from pqm_ext.launch.common import Signals
    from pqm_ext.launch.slurm import wait

    monkeypatch.setenv("PQM_SLURM_STATUS_GRACE", "20")
    req, paths = _request(tmp_path, 2)
    paths.status(1).write_text("0\n")
    late = threading.Timer(3.0, lambda: paths.status(2).write_text("0\n"))
    late.start()
    try:
        assert wait("7", req, paths, Signals("t", lambda: None), "t") == {1: 0, 2: 0}
    finally:
        late.cancel()


def test_without_a_status_the_logs_footer_decides(tmp_path, squeue_says_finished, monkeypatch):
    from pqm_ext.launch.common import Signals
    from pqm_ext.launch.slurm import wait

    monkeypatch.setenv("PQM_SLURM_STATUS_GRACE", "0.2")
    req, paths = _request(tmp_path, 3)
    Path(req.log_for(1)).write_text("# true\n#\n# Accounting: time=1 threads=1\n# Ended (code 0) at now\n")
    Path(req.log_for(2)).write_text("# true\n#\n# Ended (code 143) at now, elapsed time 3 seconds\n")
    assert wait("7", req, paths, Signals("t", lambda: None), "t") == {1: 0, 2: 143, 3: None}


def test_a_terminated_task_writes_no_status(tmp_path):
    """SIGTERM reaches a task on scancel, at its time limit and when it is preempted or requeued: it writes
    its log's footer but no status, so the launcher waits for a requeued task instead of failing it."""
    req, paths = _request(tmp_path)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(dict(log=req.log, command="touch started; sleep 60", var="JOB", first=1, last=1,
                                    options={})))
    proc = subprocess.Popen([sys.executable, "-m", "pqm_ext.launch.task", str(spec), "1"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 30
    while not (tmp_path / "started").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 143
    assert not paths.status(1).exists() and paths.footer_status(1) == 143


def test_a_failure_says_what_its_code_usually_means(capsys):
    from pqm_ext.launch.common import Request, report

    req = Request(log="log/f.JOB.log", command="x", var="JOB", first=1, last=3)
    assert report("slurm.sh", req, {1: 0, 2: 137, 3: 143}) == 1
    err = capsys.readouterr().err
    assert "JOB=2 failed with code 137 (SIGKILL: out of memory, or past its time limit?)" in err
    assert "JOB=3 failed with code 143 (SIGTERM: cancelled, past its time limit, or preempted?)" in err


# ---- a live Slurm ----

def launch(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([str(REPO / "utils/slurm.sh"), "--config", str(TEMPLATE_CONF), *args], cwd=cwd,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PQM_SLURM_STATUS_GRACE": "3"})  # one host: no NFS delay
    print(res.stderr)
    return res


def job_id(res: subprocess.CompletedProcess) -> str:
    return re.search(r"submitted Slurm job (\d+)", res.stderr)[1]


@pytest.mark.slurm
def test_array_of_three_succeeds_on_live_slurm(slurm, tmp_path):
    res = launch(tmp_path, "JOB=1:3", "log/a.JOB.log", "echo task JOB of $SLURM_ARRAY_JOB_ID")
    assert res.returncode == 0, res.stderr
    job = job_id(res)
    record = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    print(f"slurmctld ({slurm}) knows job {job}:\n{record}")
    assert f"ArrayJobId={job}" in record and "JobName=a.JOB" in record
    for i in (1, 2, 3):
        text = (tmp_path / f"log/a.{i}.log").read_text()
        assert f"# Slurm job {job}_{i} on " in text and f"task {i} of {job}\n" in text
        assert "# Ended (code 0)" in text
    assert sorted(p.name for p in (tmp_path / "log").glob("*.log")) == ["a.1.log", "a.2.log", "a.3.log"]


@pytest.mark.slurm
def test_failing_task_is_listed(slurm, tmp_path):
    res = launch(tmp_path, "JOB=1:3", "log/f.JOB.log", "exit $(( JOB == 2 ? 4 : 0 ))")
    assert res.returncode == 1
    assert "JOB=2 failed with code 4, log: log/f.2.log" in res.stderr and "(JOB=2)" in res.stderr
    assert "# Ended (code 0)" in (tmp_path / "log/f.3.log").read_text()


@pytest.mark.slurm
def test_gpu_mem_and_threads_map_through_the_config(slurm, tmp_path):
    res = launch(tmp_path, "--gpu", "1", "--mem", "100M", "--num_threads", "2", "--time", "5", "log/g.log",
                 "echo gpus=$SLURM_JOB_GPUS cvd=$CUDA_VISIBLE_DEVICES mem=$SLURM_MEM_PER_NODE "
                 "cpus=$SLURM_CPUS_PER_TASK omp=$OMP_NUM_THREADS")
    assert res.returncode == 0, res.stderr
    assert "gpus=0 cvd=0 mem=100 cpus=2 omp=2\n" in (tmp_path / "log/g.log").read_text()
    record = subprocess.run(["scontrol", "show", "job", job_id(res)], capture_output=True, text=True).stdout
    assert "MinMemoryNode=100M" in record and "TimeLimit=00:05:00" in record


@pytest.mark.slurm
def test_max_jobs_run_throttles_the_array(slurm, tmp_path):
    count = "mkdir -p run; touch run/JOB; ls run | wc -l > count.JOB; sleep 0.3; rm run/JOB"
    res = launch(tmp_path, "--max-jobs-run", "1", "JOB=1:3", "log/m.JOB.log", count)
    assert res.returncode == 0, res.stderr
    assert [(tmp_path / f"count.{i}").read_text().strip() for i in (1, 2, 3)] == ["1", "1", "1"]


@pytest.mark.slurm
def test_task_that_never_ran_is_reported(slurm, tmp_path):
    # Task 1 cancels the still-pending task 2 (the array runs one task at a time).
    cancel = f"[ JOB = 1 ] && SLURM_CONF={slurm} scancel ${{SLURM_ARRAY_JOB_ID}}_2; true"
    res = launch(tmp_path, "--max_jobs_run", "1", "JOB=1:2", "log/n.JOB.log", cancel)
    assert res.returncode == 1
    assert "JOB=2 never ran (no exit status), log: log/n.2.log" in res.stderr
    assert "JOB=1 " not in res.stderr


@pytest.mark.slurm
def test_refused_submission_fails(slurm, tmp_path):
    res = launch(tmp_path, "--mem", "100000G", "log/r.log", "true")
    assert res.returncode == 1 and "submission failed" in res.stderr
