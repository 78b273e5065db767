"""The slurm launcher: config mapping (always) and real array jobs against a live slurmctld (PQM_TEST_SLURM=1).

    PQM_TEST_SLURM=1 pytest -m slurm -rA tests/test_launch_slurm.py   # starts and stops tools/local_slurm.sh
"""
from __future__ import annotations

import re
import subprocess
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
    ("command sbatch\noption foo=* --foo $0\n", "x.conf:2: unknown option 'foo'"),
    ("command sbatch\nqueue gpu\n", "x.conf:2: unknown line type 'queue'"),
    ("option mem=* --mem $0\n", "x.conf: no 'command"),
    ("command sbatch\noption mem\n", "x.conf:2: expected"),
])
def test_bad_config_is_an_error(tmp_path, text, message):
    (tmp_path / "x.conf").write_text(text)
    with pytest.raises(UsageError, match=re.escape(message)):
        load_config(str(tmp_path / "x.conf"))


def test_option_without_rule_exits_2(tmp_path):
    (tmp_path / "x.conf").write_text("command sbatch\noption mem=* --mem $0\n")
    res = subprocess.run([str(REPO / "utils/slurm.sh"), "--config", "x.conf", "--gpu", "1", "log/a.log", "true"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "--gpu 1: x.conf has no 'option gpu=...' rule" in res.stderr


# ---- a live Slurm ----

def launch(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([str(REPO / "utils/slurm.sh"), "--config", str(TEMPLATE_CONF), *args], cwd=cwd,
                         capture_output=True, text=True, timeout=120)
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
