"""Hand a secret to another process through a pipe, never through argv or a file.

A child reads the secret from an inherited pipe (``fd=N`` for swtpm,
``/proc/self/fd/N`` for QEMU and qemu-img), or QEMU receives the pipe over
its QMP socket (SCM_RIGHTS). The secret is written into the pipe and the
write end closed before the reader starts, so a reader that reads until end of
file gets exactly the secret and nothing on disk or in ``ps`` ever shows it.
Secrets here are keys of at most a few hundred bytes, far below a pipe's
buffer (64 KiB on Linux), so the write never blocks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

#: A pipe buffers at least this much on Linux (one page is the POSIX minimum; 64 KiB here).
_MAX_SECRET = 4096


@contextlib.contextmanager
def secret_pipe(secret: bytes) -> Iterator[int]:
    """Yield the read end of a pipe that holds ``secret`` and then end-of-file.

    The read end is inheritable (for ``pass_fds``) and closed when the block exits;
    the child keeps its own copy.
    """
    if len(secret) > _MAX_SECRET:
        raise ValueError("secret too large for a pipe hand-over")
    read_fd, write_fd = os.pipe()
    try:
        # At most PIPE_BUF (4096) bytes: one atomic, complete write.
        os.write(write_fd, secret)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    try:
        yield read_fd
    finally:
        os.close(read_fd)
