"""What a person sees: other programs' chatter (Ray's C++ core, img2dataset's prints and bars,
the processes they start) goes to a log file, so that the terminal shows our own progress
bars, results and errors."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

from amused.plumbing.storage import is_local, join, scratch_folder, url_to_fs


@contextmanager
def output_to_log(path: str, fds: tuple[int, ...] = (1, 2), keep_python_stderr: bool = False) -> Iterator[TextIO]:
    """While open, the file descriptors `fds` (what C code writes to, and what child processes
    inherit) and the matching Python streams (sys.stdout for 1, sys.stderr for 2) append to
    the local file `path`; yields a text stream on the terminal's stderr for our own progress
    bars. With `keep_python_stderr`, sys.stderr moves to that stream instead, so that
    Python's warnings, tracebacks and our messages still show there."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    python = {"stdout": sys.stdout, "stderr": sys.stderr}
    for stream in python.values():
        stream.flush()
    try:  # where Python's stderr goes now: the terminal, or where an enclosing call keeps it
        shown = python["stderr"].fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (a test's capture)
        shown = 2
    terminal = open(os.dup(shown), "w", buffering=1, errors="backslashreplace",
                    encoding=getattr(python["stderr"], "encoding", None) or "utf-8")
    saved = {fd: os.dup(fd) for fd in fds}
    with open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace") as log:
        log.write(f"--- pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        log.flush()
        for fd in fds:
            os.dup2(log.fileno(), fd)
        sys.stdout = log if 1 in fds else sys.stdout
        sys.stderr = terminal if keep_python_stderr else log if 2 in fds else sys.stderr
        try:
            yield terminal
        finally:
            for stream in (sys.stdout, sys.stderr, terminal):
                stream.flush()
            sys.stdout, sys.stderr = python["stdout"], python["stderr"]
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            terminal.close()


def local_log(folder: str, name: str) -> str:
    """A log file for work on `folder`: in it when local, else in this node's scratch copy of
    it (a file descriptor cannot point at s3)."""
    if is_local(folder):
        return join(url_to_fs(folder)[1], "logs", name)
    return str(scratch_folder(folder) / "logs" / name)
