"""The server's persistent secret, made on first start in the state directory, and what it keys.

Values that must look random yet stay the same across restarts (the SCRAM salts shown
for users without SCRAM keys) are derived from it: made afresh at each start, they would
tell those users apart from the ones whose salt is stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os

#: The secret's file name inside the state directory, and its size.
SECRET_FILE = "secret"
SECRET_SIZE = 32


class SecretError(OSError):
    """The secret file exists but does not hold a secret (wrong size)."""


def load_or_create_secret(directory: str) -> tuple[bytes, list[str]]:
    """The secret in ``directory``, made (mode 0600) if missing; and the paths this created.

    ``directory`` must exist.  The file appears whole or not at all (written aside,
    then linked into place), so a second process starting at once reads the same one.
    """
    path = os.path.join(directory, SECRET_FILE)
    created = []
    if not os.path.exists(path):
        temp = os.path.join(directory, f".{SECRET_FILE}-{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(SECRET_SIZE))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(temp, path)
                created.append(path)
        finally:
            os.unlink(temp)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    with open(path, "rb") as f:
        secret = f.read(SECRET_SIZE + 1)
    if len(secret) != SECRET_SIZE:
        raise SecretError(
            f"{path}: holds {len(secret)} bytes instead of {SECRET_SIZE}; remove it and "
            "popserv makes a new one at the next start (salts shown to SCRAM clients change)"
        )
    return secret, created


def scram_salt(secret: bytes, mechanism: str, user: str) -> bytes:
    """A 16-byte salt for ``user`` that only the secret's holder can compute, the same each time."""
    message = f"scram-salt\0{mechanism}\0{user}".encode("utf-8", "surrogateescape")
    return hmac.digest(secret, message, hashlib.sha256)[:16]
