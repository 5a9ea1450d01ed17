"""Run the real ``pixelwise`` entry point from tests: one process per call, or many forked from one.

Shared by the CLI error tables (``test_cli_errors*.py``): each case must exit 2 with one line
``error: ...`` naming the file or argument, no traceback, and write nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


ENV = {**os.environ, "PYTHONPATH": str(SRC)}

# Runs ``pixelwise.cli.main`` once per argument list (JSON on stdin), each in its own forked
# process that ends as the interpreter would (exit code, excepthook traceback), with its
# stdout and stderr in files: one torch import for all cases instead of one per case.
FORKING_RUNNER = r"""
import json, os, shutil, sys, tempfile
import pixelwise.cli


def child(args, out, err):
    os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT), 1)
    os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT), 2)
    sys.argv = ["pixelwise", *args]
    code = 1
    try:
        pixelwise.cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        sys.excepthook(*sys.exc_info())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


cases, folder, codes, running = json.load(sys.stdin), tempfile.mkdtemp(), {}, {}
files = [(os.path.join(folder, f"{i}.out"), os.path.join(folder, f"{i}.err")) for i in range(len(cases))]
for i, args in enumerate(cases + [None] * 4):
    if len(running) >= 4 or args is None and running:
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    if args is not None:
        pid = os.fork()
        if pid == 0:
            child(args, *files[i])
        running[pid] = i
results = [[codes[i], open(o).read(), open(e).read()] for i, (o, e) in enumerate(files)]
shutil.rmtree(folder)
print(json.dumps(results))
"""


def run_cli(*args: str, umask: int = 0o022) -> subprocess.CompletedProcess:
    """The real entry point on this checkout's sources, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "pixelwise.cli", *args], capture_output=True, text=True,
                          timeout=300, env=ENV, umask=umask)


def run_cli_forked(cases: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """``pixelwise.cli.main`` on each argument list, each in its own process (see FORKING_RUNNER)."""
    proc = subprocess.run([sys.executable, "-c", FORKING_RUNNER], input=json.dumps(cases), capture_output=True,
                          text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return [subprocess.CompletedProcess(args, code, out, err) for args, (code, out, err) in
            zip(cases, json.loads(proc.stdout))]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every path under ``root``: compare before and after to see that nothing changed."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def run_cases(cases: list[tuple[str, list[str], str]], values: dict, outs: Path) -> dict:
    """Run each ``(name, args, expected)`` case with ``{key}`` in args filled from ``values`` and ``{out}``
    a fresh path under ``outs``; returns ``{name: (CompletedProcess, out path)}``."""
    out_paths, arg_lists = [], []
    for name, args, _ in cases:
        out_paths.append(outs / name.replace(" ", "_").replace("/", "_"))
        filled = {**{k: str(v) for k, v in values.items()}, "out": str(out_paths[-1])}
        arg_lists.append([a.format(**filled) for a in args])
    return dict(zip((c[0] for c in cases), zip(run_cli_forked(arg_lists), out_paths)))


def assert_one_error_line(proc: subprocess.CompletedProcess, expected: str, out: Path | None = None) -> None:
    """Exit code 2, exactly one stderr line ``error: ...`` containing ``expected``, no traceback, ``out`` absent."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    if out is not None:
        assert not out.exists(), sorted(p.name for p in out.rglob("*"))
