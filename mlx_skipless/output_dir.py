"""Claiming an output directory for one run and replacing it atomically.

A run may be interrupted, killed or raced by another run at any point; the output
must then be either the old one or the new one, whole, with no stray partial
directories kept, and never a directory this tool did not write.
"""

import fcntl
import glob
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

from .errors import CheckpointError
from .manifest import foreign_entries, write_manifest, written_by_us


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies inside it (both resolved)."""
    return a == b or b in a.parents


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Terminated(SystemExit):
    """SIGTERM, raised where the process was, so cleanup runs as it does for Ctrl-C."""


class OutputDir:
    """An output model directory, claimed for one run.

    Entering checks the path, takes a lock beside it (a second writer of the same
    output fails at once instead of replacing the first's work), removes stale
    partial directories that dead runs left, and turns SIGTERM into an exception so
    cleanup runs. `stage()` yields a fresh directory beside the output that becomes
    the output only when its block completes. The output may not be, contain, or lie
    inside any of `inputs`; an existing output is replaced only with `force`, and
    only if it is empty or a model this tool wrote. A run that commits nothing leaves
    no directories it made."""

    def __init__(self, final, force: bool = False, inputs: Iterable = (), log=None):
        self.given = Path(final)
        self.final = Path(os.path.abspath(self.given.expanduser()))
        self.force, self.inputs = force, [Path(p) for p in inputs if p is not None]
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.made, self.lock, self.committed, self.old_handler = [], None, False, None
        self.seen = ()  # what the first check found at the path

    def protect(self, *inputs):
        """Also refuse to overlap `inputs` (those known only after the first check)."""
        self.inputs += [Path(p) for p in inputs if p is not None]
        return self

    def check(self):
        """Refuse an output that would destroy an input or something not ours, or
        that another process wrote since the first check."""
        given, final = self.given, self.final
        self._restore_interrupted()
        try:
            st = os.lstat(final)
            found = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            found = None
        if self.seen == ():
            self.seen = found
        elif found != self.seen:
            raise CheckpointError(f"{given} was written by another process while this one worked; nothing was replaced")
        if final.is_symlink():
            raise CheckpointError(f"{given} is a symbolic link; name the directory itself")
        real = final.resolve()
        if real == real.parent or _inside(Path.cwd().resolve(), real):
            raise CheckpointError(f"{given} is or holds the current directory; choose a new directory for the output")
        for inp in self.inputs:
            inp = inp.expanduser().resolve()
            if _inside(real, inp) or _inside(inp, real):
                raise CheckpointError(
                    f"{given} would overlap the input {inp}: the output may not be "
                    "the input, contain it, or lie inside it"
                )
        if not final.exists():
            return None
        if not final.is_dir():
            raise CheckpointError(f"{given} exists and is not a directory")
        if not self.force:
            raise CheckpointError(f"{given} exists; pass --force to overwrite it")
        if not any(final.iterdir()):
            return "an empty directory"
        writer = written_by_us(final)
        if writer is None:
            raise CheckpointError(
                f"{given} exists and is not a model mlx-skipless wrote; --force "
                "replaces only those (or an empty directory): choose another path"
            )
        foreign = foreign_entries(final)
        if foreign:
            raise CheckpointError(
                f"{given} holds files mlx-skipless did not write ({', '.join(foreign[:5])}); "
                "move them or choose another path"
            )
        return f"a model written by {writer}"

    def __enter__(self):
        self.check()
        self._make_parents()
        try:
            self._lock()
            replacing = self.check()  # again, now that no other writer can change it
            if replacing:
                self.log(f"[INFO] replacing {self.given} ({replacing})")
            self._remove_stale()
        except BaseException:
            self._release()
            raise
        if threading.current_thread() is threading.main_thread():  # only there can Python handle it
            self.old_handler = (signal.signal(signal.SIGTERM, self._terminate),)
        return self

    def __exit__(self, *exc):
        if self.old_handler is not None:
            signal.signal(signal.SIGTERM, self.old_handler[0] if self.old_handler[0] is not None else signal.SIG_DFL)
            self.old_handler = None
        self._release()
        return False

    @staticmethod
    def _terminate(signum, frame):
        raise _Terminated(128 + signum)

    def _make_parents(self):
        missing = [p for p in self.final.parents if not p.exists()]
        for p in reversed(missing):
            try:
                p.mkdir()
            except FileExistsError:
                continue
            self.made.append(p)

    def _lock(self):
        # Not the filelock package: its Unix lock has kept or removed the file on release from
        # one version to another, and only some versions refuse a lock on a file a holder has
        # just removed; this lock must leave no file behind and never let two runs hold it.
        path = self.final.with_name(f".{self.final.name}.lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise CheckpointError(
                    f"another process is writing {self.given}; wait for it or choose another path"
                ) from None
            try:  # the lock holder before us may have removed the file we locked
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.lock = (fd, path)
                return
            os.close(fd)

    def _release(self):
        if self.lock:
            fd, path = self.lock
            path.unlink(missing_ok=True)  # while holding it: a waiting run re-checks the inode
            os.close(fd)
            self.lock = None
        if not self.committed:
            for p in reversed(self.made):
                try:
                    p.rmdir()
                except OSError:
                    break
        self.made = []

    def _leftovers(self, kind: str):
        """(path, pid) of what an earlier run of ours left beside the output: exactly the names
        stage() makes (.NAME.partial-PID-HEX8, .NAME.old-PID), nothing that merely resembles them."""
        pattern = re.compile(
            re.escape(f".{self.final.name}.{kind}-") + (r"(\d+)-[0-9a-f]{8}" if kind == "partial" else r"(\d+)")
        )
        for p in self.final.parent.glob(f".{glob.escape(self.final.name)}.{kind}-*"):
            m = pattern.fullmatch(p.name)
            if m and p.is_dir() and not p.is_symlink():
                yield p, int(m.group(1))

    def _restore_interrupted(self):
        """A run killed between the two renames of its commit left the old output aside and
        none at the path: put it back before anything else, so no rerun loses it."""
        if self.final.exists() or self.final.is_symlink() or not self.final.parent.is_dir():
            return
        for p, pid in self._leftovers("old"):
            if pid != os.getpid() and not _pid_alive(pid):
                try:
                    p.rename(self.final)
                except OSError:  # another run restored it first
                    continue
                self.log(f"[INFO] restored {self.given} from {p.name}, left by a run interrupted while replacing it")
                return

    def _remove_stale(self):
        for kind in ("partial", "old"):
            for p, pid in self._leftovers(kind):
                if pid != os.getpid() and not _pid_alive(pid):
                    shutil.rmtree(p, ignore_errors=True)
                    self.log(f"[INFO] removed {p.name}, left by an interrupted run")

    @contextmanager
    def stage(self):
        staging = self.final.with_name(f".{self.final.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        staging.mkdir()  # mode 0777 less the umask, as any new directory
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        write_manifest(staging)
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            self.final.rename(old)
            staging.rename(self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(self.final)
        self.committed = True


@contextmanager
def staged_directory(final: Path, force: bool = False, inputs: Iterable = ()):
    """Yield a temporary directory beside `final`; it becomes `final` only if the
    block completes, so a failed or interrupted run leaves nothing half-written
    (see OutputDir for what may be replaced)."""
    with OutputDir(final, force, inputs) as out, out.stage() as staging:
        yield staging
