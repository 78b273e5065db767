"""The local and stdout launchers, run as real processes through utils/*.sh (concurrency checked with files, not clocks)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def launch(backend: str, *args: str, cwd: Path, env: dict = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "utils" / f"{backend}.sh"), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_jobs_run_in_parallel(tmp_path):
    # Each job waits for the other's flag: sequential jobs would time out and fail.
    wait_other = "touch flag.JOB; for i in $(seq 200); do [ -e flag.$((3-JOB)) ] && exit 0; sleep 0.05; done; exit 1"
    res = launch("run", "JOB=1:2", "log/p.JOB.log", wait_other, cwd=tmp_path)
    assert res.returncode == 0, res.stderr


def test_log_header_footer_and_job_substitution(tmp_path):
    res = launch("run", "JOB=1:3", "log/x.JOB.log", "echo", "out", "JOB", "$JOB", "JOBS", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for i in (1, 2, 3):
        lines = (tmp_path / f"log/x.{i}.log").read_text().splitlines()
        assert lines[0] == f"# echo out {i} $JOB JOBS"  # whole words only; $JOB is left to the shell
        assert lines[1].startswith("# Started at ")
        assert f"out {i} {i} JOBS" in lines
        assert lines[-2].startswith("# Accounting: time=") and lines[-2].endswith(" threads=1")
        assert lines[-1].startswith("# Ended (code 0) at ")


def test_quoting_follows_kaldi(tmp_path):
    # Several arguments: the one with a space is quoted, a bare "|" (typed \| in a shell) is a pipe.
    res = launch("run", "log/q.log", "echo", "a  b", "c", "|", "tr", "a", "x", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "x  b c\n" in (tmp_path / "log/q.log").read_text()
    res = launch("run", "log/one.log", "echo 'a  b' | tr a y && echo done", cwd=tmp_path)
    assert "y  b\ndone\n" in (tmp_path / "log/one.log").read_text()


def test_failed_job_is_named_and_others_complete(tmp_path):
    res = launch("run", "JOB=1:3", "log/f.JOB.log", "if [ JOB = 2 ]; then exit 3; fi; sleep 0.3; echo ok", cwd=tmp_path)
    assert res.returncode == 1
    assert "JOB=2 failed with code 3" in res.stderr and "log/f.2.log" in res.stderr
    assert "JOB=1 " not in res.stderr and "JOB=3 " not in res.stderr
    assert "# Ended (code 3)" in (tmp_path / "log/f.2.log").read_text()
    for i in (1, 3):
        text = (tmp_path / f"log/f.{i}.log").read_text()
        assert "ok\n" in text and "# Ended (code 0)" in text


@pytest.mark.parametrize("args", [
    ["JOB=3:1", "log/x.JOB.log", "true"],         # empty range
    ["JOB=a:b", "log/x.JOB.log", "true"],         # not numbers
    ["log/x.JOB.log", "true"],                    # JOB in the log path, no range
    ["JOB=1:2", "log/x.log", "true"],             # two jobs, one log
    ["JOB=1:2", "log/x.JOB.log"],                 # no command
    [],                                           # nothing
    ["--bogus", "1", "JOB=1:2", "log/x.JOB.log", "true"],
    ["--gpu", "-1", "JOB=1:2", "log/x.JOB.log", "true"],
    ["-p", "gpu", "JOB=1:2", "log/x.JOB.log", "true"],   # Kaldi's scheduler flags: not a log named '-p'
])
def test_bad_usage_exits_2(tmp_path, args):
    res = launch("run", *args, cwd=tmp_path)
    assert res.returncode == 2 and "run.sh: error:" in res.stderr and "usage:" in res.stderr
    assert not (tmp_path / "log").exists()


# Records how many jobs run at once: a job registers, counts the registered, works, deregisters.
COUNT = "mkdir -p run; touch run/JOB; ls run | wc -l > count.JOB; sleep 0.2; rm run/JOB"


@pytest.mark.parametrize("spelling", ["--max_jobs_run", "--max-jobs-run"])
def test_max_jobs_run_is_honoured(tmp_path, spelling):
    res = launch("run", spelling, "2", "JOB=1:6", "log/m.JOB.log", COUNT, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    counts = [int((tmp_path / f"count.{i}").read_text()) for i in range(1, 7)]
    assert max(counts) <= 2


def test_gpus_are_shared_out_exclusively(tmp_path):
    # Two visible GPUs, one per job: at most two jobs at once, never two on one device (mkdir is atomic).
    claim = "mkdir gpu.$CUDA_VISIBLE_DEVICES || exit 9; echo $CUDA_VISIBLE_DEVICES > dev.JOB; " + COUNT + \
            "; rmdir gpu.$CUDA_VISIBLE_DEVICES"
    res = launch("run", "--gpu", "1", "JOB=1:4", "log/g.JOB.log", claim, cwd=tmp_path,
                 env={"CUDA_VISIBLE_DEVICES": "5,7"})
    assert res.returncode == 0, res.stderr
    assert {(tmp_path / f"dev.{i}").read_text().strip() for i in range(1, 5)} <= {"5", "7"}
    assert max(int((tmp_path / f"count.{i}").read_text()) for i in range(1, 5)) <= 2
    res = launch("run", "--gpu", "3", "log/x.log", "true", cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": "5,7"})
    assert res.returncode == 2 and "only 2 GPU(s)" in res.stderr


def test_jobs_per_gpu_shares_each_device_up_to_that_many_jobs(tmp_path):
    # Two GPUs, two jobs per GPU: a job takes one of its device's two places (mkdir is atomic) or fails,
    # then waits until four jobs run at once; with one job per GPU only two could, and every count stays 2.
    claim = ("d=$CUDA_VISIBLE_DEVICES; if mkdir gpu.$d.a 2>/dev/null; then p=a; elif mkdir gpu.$d.b 2>/dev/null; "
             "then p=b; else exit 9; fi; echo $d > dev.JOB; mkdir -p run; touch run/JOB; "
             "for k in $(seq 50); do [ $(ls run | wc -l) -ge 4 ] && break; sleep 0.1; done; "
             "ls run | wc -l > count.JOB; sleep 0.2; rm run/JOB; rmdir gpu.$d.$p")
    res = launch("run", "--gpu", "1", "--jobs_per_gpu", "2", "JOB=1:8", "log/g.JOB.log", claim, cwd=tmp_path,
                 env={"CUDA_VISIBLE_DEVICES": "5,7"})
    assert res.returncode == 0, res.stderr
    assert {(tmp_path / f"dev.{i}").read_text().strip() for i in range(1, 9)} == {"5", "7"}
    assert max(int((tmp_path / f"count.{i}").read_text()) for i in range(1, 9)) == 4
    res = launch("run", "--jobs_per_gpu", "0", "log/x.log", "true", cwd=tmp_path)
    assert res.returncode == 2 and "--jobs_per_gpu" in res.stderr


@pytest.mark.parametrize("none", ["", "NoDevFiles"])  # NoDevFiles: what Slurm/SGE set on a node without GPUs
def test_gpu_option_passes_through_without_gpus(tmp_path, none):
    res = launch("run", "--gpu", "1", "--mem", "4G", "--time", "1:00:00", "--num_threads", "3", "log/c.log",
                 "echo cvd=[$CUDA_VISIBLE_DEVICES] omp=$OMP_NUM_THREADS", cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": none})
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "log/c.log").read_text()
    assert f"cvd=[{none}] omp=3" in text and "threads=3" in text


def test_stdout_backend_echoes_and_logs_in_order(tmp_path):
    res = launch("stdout", "JOB=1:3", "log/s.JOB.log", "echo line JOB; [ JOB != 2 ]", cwd=tmp_path)
    assert res.returncode == 1 and "JOB=2 failed" in res.stderr
    assert res.stdout == "line 1\nline 2\nline 3\n"
    assert "line 3\n# Accounting" in (tmp_path / "log/s.3.log").read_text()


def test_wrapper_works_through_a_recipe_symlink(tmp_path):
    recipe = tmp_path / "egs" / "demo"
    recipe.mkdir(parents=True)
    (recipe / "utils").symlink_to(REPO / "utils")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(["utils/run.sh", "JOB=1:2", "exp/log/w.JOB.log", "echo JOB"], cwd=recipe,
                         capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "\n2\n" in (recipe / "exp/log/w.2.log").read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: the ssh session dropped
def test_a_signal_stops_the_jobs_and_logs_it(tmp_path, signum):
    proc = subprocess.Popen([str(REPO / "utils/run.sh"), "JOB=1:2", "log/k.JOB.log", "touch started.JOB; sleep 60"],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not all((tmp_path / f"started.{i}").exists() for i in (1, 2)):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signum)
    assert proc.wait(timeout=20) == 128 + signum
    for i in (1, 2):
        assert f"# Ended (code {128 + signal.SIGTERM})" in (tmp_path / f"log/k.{i}.log").read_text()


def test_help(tmp_path):
    res = launch("slurm", "--help", cwd=tmp_path)
    assert res.returncode == 0 and "usage: slurm.sh" in res.stdout and "sbatch --array" in res.stdout


def test_job_glued_to_a_word_is_not_replaced_and_says_so(tmp_path):
    res = launch("run", "JOB=1:2", "log/g.JOB.log", "echo out_JOB.ark out.JOB.ark", cwd=tmp_path)
    assert res.returncode == 0 and "JOB inside a word of the command is not replaced" in res.stderr
    assert "out_JOB.ark out.2.ark" in (tmp_path / "log/g.2.log").read_text()
    res = launch("run", "JOB=1:2", "log/h.JOB.log", "echo ${JOB} $JOB x.JOB", cwd=tmp_path)
    assert res.returncode == 0 and "warning" not in res.stderr
