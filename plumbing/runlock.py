"""One writer per folder: the lock file `amused run` and training hold while they work.

    FOLDER/run.lock, RUN_DIR/train.lock   {"host", "pid", "started", "since", "command"}

A second process on a locked folder stops before it changes anything, with an error
naming the holder. A lock whose holder is gone is taken over, with a message; that is
known for sure only on the holder's own host (no process with that pid and that start
time, so a reused pid is not mistaken for the holder). A holder on another host cannot
be checked from here: the lock is refused, naming the holder and the file to delete if
that process is really gone. There is no lease or heartbeat that expires by itself.

Taking the lock is an exclusive create: a hard link of the written file (O_EXCL
semantics, also on NFS) on a POSIX file system, a conditional PUT (If-None-Match: *) on
S3 through s3fs. Of two racing conditional PUTs AWS refuses the loser with 412
PreconditionFailed or 409 ConditionalRequestConflict; both mean "not created, look
again". An S3-compatible store that ignores If-None-Match (older MinIO, Ceph RGW and
others) overwrites instead, and then the lock excludes nobody: check yours by writing
one key twice, e.g. `aws s3api put-object --bucket B --key k --if-none-match '*'` run
twice must fail the second time. Other object stores get fsspec's look-then-write, which
two processes starting in the same instant can both pass. Taking over a stale lock on a POSIX file
system happens under flock on that very file, so that of two takers one wins; on an
object store the removal and the new create are separate requests, and a taker that
removes the lock another taker has just made in that gap is not detected.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass

import psutil

from amused.plumbing.storage import is_local, url_to_fs


class FolderLocked(RuntimeError):
    """Another process holds the lock."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float  # the process's start time: a later process with the same pid is not the holder
    since: float
    command: str

    @classmethod
    def me(cls) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time(), time.time(),
                   " ".join(sys.argv)[:300])

    def running(self) -> bool:
        """Whether the holder process still runs (meaningful on its own host only)."""
        try:
            proc = psutil.Process(self.pid)
            return abs(proc.create_time() - self.started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:
            return True  # another user's process: it exists, so count it as the holder

    def __str__(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"pid {self.pid} on host {self.host} since {since} (command: {self.command or '?'})"


def _lost_race(exc: OSError) -> bool:
    """A conditional PUT another writer won: s3fs names only a 412 that says which
    condition failed FileExistsError; AWS's 409 for two racing conditional writes (and
    a bare 412) reach us as plain OSErrors carrying botocore's answer as their cause."""
    answer = getattr(exc.__cause__, "response", None) or {}
    code = answer.get("Error", {}).get("Code")
    status = answer.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("ConditionalRequestConflict", "PreconditionFailed") or status in (409, 412)


class FolderLock:
    """`with FolderLock(url):` holds the lock file at `url` (its folder is created)."""

    def __init__(self, url: str, log=None):
        self.url = url
        self.fs, self.path = url_to_fs(url)
        self.local = is_local(url)
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.mine: Holder | None = None

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        me = Holder.me()
        self.fs.makedirs(self.path.rpartition("/")[0], exist_ok=True)
        for _ in range(3):
            if self._create(me):
                self.mine = me
                return
            holder = self._read()
            if holder == me:  # our own create, whose answer was lost and which the retry then found taken
                self.mine = me
                return
            if holder is None:
                continue  # released between our create and our look
            if holder.host != me.host:
                raise FolderLocked(f"{self.url} is held by {holder}; a process on another host cannot be checked "
                                   f"from here: if it is really gone, delete {self.url} and start again")
            if holder.running():
                raise FolderLocked(f"{self.url} is held by {holder}: another process is working in this folder; "
                                   "wait for it to finish or stop it")
            if self._remove(holder):
                self.log(f"took over the lock {self.url}: its holder, {holder}, is no longer running")
        raise FolderLocked(f"{self.url} changed hands while this process tried to take it; start again")

    def release(self) -> None:
        if self.mine is not None and self._read() == self.mine:
            self.fs.rm(self.path)
        self.mine = None

    def _create(self, me: Holder) -> bool:
        data = json.dumps(asdict(me)).encode()
        if not self.local:
            try:
                self.fs.pipe_file(self.path, data, mode="create")
                return True
            except FileExistsError:
                return False
            except OSError as exc:
                if _lost_race(exc):
                    return False
                raise
        # Written in full under a private name, then linked: the lock file is never seen half-written.
        tmp = f"{self.path}.{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _read(self) -> Holder | None:
        try:
            text = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            return Holder(**json.loads(text))
        except (ValueError, TypeError):
            raise FolderLocked(f"{self.url} exists but names no holder; delete it if no process works in this "
                               "folder") from None

    def _remove(self, stale: Holder) -> bool:
        """Removes the lock if it still names `stale`; False when it changed meanwhile."""
        if not self.local:
            if self._read() != stale:
                return False
            self.fs.rm(self.path)
            return True
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            return False
        with fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            # A taker that got here first has replaced the file: only the file read here may go.
            try:
                same_file = os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                return False
            if not same_file or Holder(**json.loads(fh.read())) != stale:
                return False
            os.unlink(self.path)
            return True
