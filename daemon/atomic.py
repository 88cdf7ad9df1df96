"""Write a file whole or not at all: a temporary file beside it, fsynced, then renamed over it.

Called from whichever thread writes the file (the recorder's thread, the exporter). The process umask is only read
(from /proc where it can be), never set: it is process-wide, and setting it even for a moment would give the files
that other threads create meanwhile the wrong permissions.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

DEFAULT_UMASK = 0o022  # assumed where the umask cannot be read without setting it (no /proc/self/status)


def current_umask() -> int:
    """The process umask, read without changing it (Linux 4.7+: the `Umask:` line of /proc/self/status);
    `DEFAULT_UMASK` where it cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split(":", 1)[1].strip(), 8)
    except (OSError, ValueError):
        pass
    return DEFAULT_UMASK


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
            os.fchmod(fh.fileno(), mode & ~current_umask())
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
