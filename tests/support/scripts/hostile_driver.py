"""Runs `mlxvid` commands in one process, each in a forked child under a time and memory limit.

    python hostile_driver.py CASES.json RESULTS.json

CASES.json is {"cases": [{"name", "argv"} or {"name", "code"}], "seconds", "limit_bytes"}. The parent
imports mlxvid once; each case runs in a child forked
from it with its address space capped (`resource.setrlimit(RLIMIT_AS)`: what the parent maps plus
`limit_bytes`) and is killed after `seconds`. RESULTS.json gets, per case: the exit code, or the signal that
ended it, the wall time, the child's peak resident memory (bytes) and what it wrote to stderr.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
import traceback


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _run(case: dict) -> None:
    """A command line through `mlxvid`'s own main(), or Python code (an `MlxVideoError` is reported as main()
    reports it)."""
    from mlx_video.cli import main
    from mlx_video.errors import MlxVideoError

    if "argv" in case:
        main(case["argv"])
        return
    try:
        exec(case["code"], {})
    except MlxVideoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def _child(case: dict, err_path: str, limit: int, seconds: float) -> None:

    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    out = os.open(os.devnull, os.O_WRONLY)
    os.dup2(out, 1)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.alarm(int(seconds) + 1)
    code = 0
    try:
        _run(case)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # what main() let through: the test reports it as a traceback
        traceback.print_exc()
        code = 99
    sys.stderr.flush()
    os._exit(code)


def run_case(case: dict, err_path: str, limit_bytes: int, seconds: float) -> dict:
    limit = _vm_bytes() + limit_bytes
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            _child(case, err_path, limit, seconds)
        finally:
            os._exit(98)
    deadline = start + seconds + 2
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            break
        time.sleep(0.01)
    with open(err_path, errors="replace") as f:
        err = f.read()
    return {
        "name": case["name"],
        "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "seconds": time.monotonic() - start,
        "peak_bytes": usage.ru_maxrss * 1024,
        "stderr": err[-4000:],
    }


def _warm_up() -> None:
    """Import what the commands import, once, before forking: each child then starts at once."""
    import importlib
    import pkgutil

    import mlx.core as mx
    import tqdm.auto  # noqa: F401

    import mlx_video
    import mlx_video.convert

    modules = [*pkgutil.walk_packages(mlx_video.__path__, "mlx_video."),
               *pkgutil.walk_packages(mlx_video.convert.__path__, "mlx_video.convert.")]
    for module in modules:
        if module.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(module.name)
        except Exception:  # a module needing an optional package: the child imports it if it must
            pass
    mx.eval(mx.zeros(1) + 1)


def main() -> None:
    cases_path, results_path = sys.argv[1:3]
    with open(cases_path) as f:
        spec = json.load(f)
    _warm_up()

    results = []
    for i, case in enumerate(spec["cases"]):
        err_path = f"{results_path}.{i}.err"
        results.append(run_case(case, err_path, spec.get("limit_bytes", 1 << 30), spec.get("seconds", 5.0)))
        os.unlink(err_path)
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
