"""Runs untrusted generated programs, one subprocess each, never in the evaluator's process.

Each program runs as `python -I` (no site-packages of the user, no PYTHON* variables) in a fresh
temporary directory, under these limits:
- CPU time and address space: `resource.setrlimit` in the child before exec (RLIMIT_CPU, RLIMIT_AS;
  RLIMIT_FSIZE caps files it writes);
- wall clock: the whole process group is killed after `timeout` seconds (sleeping or blocked
  programs use no CPU time, so RLIMIT_CPU alone would not stop them);
- network: where the kernel allows it, the program runs in a new, empty network namespace
  (`unshare -n`, or `unshare -rn` as an unprivileged user), so no address is reachable. In
  addition, and as the only guard where no namespace can be made, an audit hook installed before
  the program starts refuses socket creation and connection, process creation (subprocess,
  os.system, exec, fork) and ctypes. The hook is a Python-level guard: code that reaches the C
  library another way (a compiled extension already importable) can pass it; the namespace cannot
  be passed.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

_GUARD = r"""
import sys
def _guard(event, args, _deny=("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata")):
    if event in _deny:
        raise PermissionError(f"sandbox: {event} is not allowed")
sys.addaudithook(_guard)
del _guard
__file = sys.argv[1]
with open(__file) as __f:
    __code = compile(__f.read(), __file, "exec")
del __f, __file
exec(__code, {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass
class Outcome:
    status: str  # passed, failed, timeout, out of memory, cpu time
    returncode: int | None
    seconds: float
    output: str  # the tail of stdout and stderr

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(code: str, timeout: float = 10.0, memory_mb: int = 1024, cpu_seconds: int | None = None,
                output_chars: int = 2000) -> Outcome:
    """Runs `code` as a Python program under the limits above; passed means exit status 0."""
    cpu = cpu_seconds if cpu_seconds is not None else max(1, int(timeout) + 1)
    work = tempfile.mkdtemp(prefix="gemmakit-sandbox-")
    try:
        path = os.path.join(work, "program.py")
        with open(path, "w") as f:
            f.write(code)
        cmd = [*_isolation(), sys.executable, "-I", "-c", _GUARD, path]
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=functools.partial(_limits, memory_mb * 2**20, cpu))
        try:
            out, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill(proc)
            out, _ = proc.communicate()
            timed_out = True
        seconds = time.perf_counter() - start
        text = out.decode("utf-8", "replace")[-output_chars:]
        return Outcome(_status(proc.returncode, text, timed_out), proc.returncode, round(seconds, 3), text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _limits(memory: int, cpu: int) -> None:  # runs in the child, before exec
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _status(returncode: int, output: str, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL) and "MemoryError" not in output:
        return "cpu time"
    if "MemoryError" in output or returncode == -signal.SIGSEGV:
        return "out of memory"
    return "failed"


@functools.lru_cache(maxsize=1)
def _isolation() -> tuple[str, ...]:
    """The command prefix that gives a child no network, or () where none works here."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for prefix in ((unshare, "-n", "--"), (unshare, "-rn", "--")):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            continue
    return ()


def network_isolated() -> bool:
    """Whether programs run in their own network namespace (else only the audit hook guards)."""
    return bool(_isolation())
