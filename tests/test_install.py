"""What tools/install.sh leaves behind (the test command runs it first)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_importing_espnet_does_not_go_to_the_network_for_nltk_data():
    """ESPnet imports g2p_en, which asks nltk to download two corpora it cannot find: on a compute node without
    network every job would wait for it. install.sh leaves empty stand-ins where nltk looks first."""
    venv_python = REPO / "tools/venv/bin/python"
    assert Path(sys.prefix).resolve() == (REPO / "tools/venv").resolve(), "run by tools/run_tests.sh"
    res = subprocess.run([str(venv_python), "-c", "import espnet2.tasks.asr"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
    assert res.returncode == 0, res.stderr
    assert "nltk_data" not in res.stderr and "Error loading" not in res.stderr, res.stderr
