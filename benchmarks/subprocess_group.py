"""Run a benchmark's other side (hivemind's venv) in a subprocess whose whole process group can be killed.

hivemind's DHT starts child processes and p2p daemons that inherit the pipes: on a timeout, killing the
child alone leaves them running and reading its output blocks forever. A new session makes the child
the leader of a process group that one ``killpg`` ends.
"""

from __future__ import annotations

import os
import signal
import subprocess


class SubprocessTimeout(Exception):
    """The command did not finish in time; its whole process group was killed."""


def run_group(command: list[str], timeout: float, capture_stderr: bool = True) -> tuple[int, str, str]:
    """``(returncode, stdout, stderr)`` of ``command`` (stderr passes through unless captured)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE if capture_stderr else None,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise SubprocessTimeout(f"did not finish within {timeout:.0f} s") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, stdout, stderr or ""
