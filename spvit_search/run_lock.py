"""One writer per run directory: a lock file holding the writer's pid and host.

The lock is taken by creating `.lock` exclusively (`O_EXCL`: of two processes racing, one wins). A lock whose
process is gone (killed, so it never released it) is stale and taken over; one held by a live process, or by a
process on another host (whose liveness this host cannot see), refuses the run. A directory the lock created
and nothing else wrote to is removed again on release, so a refused run leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from supernets.io import atomic_write_text

LOCK = ".lock"


class RunDirectoryInUse(ValueError):
    """Another live process writes the run directory."""


class RunLock:
    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK
        self.created_directory = False
        self.held = False

    def acquire(self) -> None:
        """Hold the lock, taking over a stale one; `RunDirectoryInUse` naming its holder when it is live."""
        directory = self.path.parent
        if not directory.exists():
            directory.mkdir(parents=True)
            self.created_directory = True
        mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n"
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self._holder()
            if holder is not None and _is_alive(holder):
                self._forget_directory()
                raise RunDirectoryInUse(
                    f"{directory} is in use by pid {holder['pid']} on {holder['host']}; wait for it to finish or "
                    f"choose another --out"
                ) from None
            atomic_write_text(self.path, mine)  # a stale lock: its holder was killed before it could release it
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(mine)
        self.held = True

    def release(self) -> None:
        if self.held and self._holder() == {"pid": os.getpid(), "host": socket.gethostname()}:
            self.path.unlink(missing_ok=True)
        self.held = False
        self._forget_directory()

    def _forget_directory(self) -> None:
        if self.created_directory and self.path.parent.is_dir() and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()

    def _holder(self) -> dict[str, object] | None:
        """The lock's pid and host; None for a lock that does not say (a writer killed while writing it)."""
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int) or "host" not in holder:
            return None
        return {"pid": holder["pid"], "host": holder["host"]}

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _is_alive(holder: dict[str, object]) -> bool:
    """Whether the holder may still be running: on this host, whether its pid exists; on another, assumed so."""
    if holder["host"] != socket.gethostname():
        return True
    pid = int(holder["pid"])  # type: ignore[call-overload]
    return pid != os.getpid() and process_exists(pid)  # its own pid: a predecessor's (a restarted container)


def process_exists(pid: int) -> bool:
    """Whether process `pid` of this host runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
