import subprocess
import sys

import hivesim


def run(*args):
    return subprocess.run([sys.executable, "-m", "hivesim.cli", *args], capture_output=True, text=True, timeout=60)


def test_version_and_help():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"hivesim {hivesim.__version__}"
    out = run("--help")
    assert out.returncode == 0 and "usage: hivesim" in out.stdout


def test_unknown_command_is_a_clear_error():
    out = run("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr
