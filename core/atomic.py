"""Write a file whole or not at all: a temporary file beside it, fsynced, then renamed over it.

Called from whichever thread writes the file (the recorder's thread, the exporter). The process umask is only read
(from /proc where it can be), never set: it is process-wide, and setting it even for a moment would give the files
that other threads create meanwhile the wrong permissions. Where it cannot be read, a file keeps no more than the
temporary file's 0600 of what was asked.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

def current_umask() -> int | None:
    """The process umask, read without changing it (Linux 4.7+: the `Umask:` line of /proc/self/status); None
    where it cannot be read so."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split(":", 1)[1].strip(), 8)
    except (OSError, ValueError):
        pass
    return None


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, *, mode: int = 0o666) -> Iterator[BinaryIO]:
    """Yield a binary file; when the block ends without an error it replaces `path`, else `path` is untouched.

    Args:
        path: the file to replace.
        mode: the permissions asked for, less the umask, as `os.open(path, ..., mode)` would give them: the
            default 0666 gives what a plain `open(path, "wb")` gives (not the 0600 of a temporary file); 0600
            keeps a file private to its owner.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        umask = current_umask()
        os.chmod(tmp, mode & ~umask if umask is not None else mode & 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
