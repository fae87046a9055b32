"""Process-wide setup at start: refuse exposed secrets, raise the descriptor limit, drop root.

``ProcessSetup`` is the first child of popserv's ``MultiService``: its
``privilegedStartService`` runs before any listener binds, and its ``startService``
after all of them have bound (twistd calls every ``privilegedStartService`` first), which
is when a server started as root becomes ``[server] user``.  The OS modules are
attributes, so tests replace them instead of changing the test process.
"""

from __future__ import annotations

import os
import pwd
import resource
import stat

from twisted.application.service import Service
from twisted.logger import Logger

from popserv.config import Config, ConfigError

log = Logger()

#: The descriptor limit popserv asks for at most (each connection is one descriptor).
FILE_LIMIT = 65536


class InsecureFile(ConfigError):
    """A secret file (users, TLS key, server secret) that other users may read or change."""


def secret_files(config: Config) -> list[tuple[str, str]]:
    """(description, path) of the files only the server may read: users, TLS key, secret."""
    from popserv.state import SECRET_FILE
    from popserv.tls import self_signed_paths

    key = config.tls_key or self_signed_paths(config.tls_self_signed_dir)[1]
    return [
        ("users file", os.path.abspath(config.users)),
        ("TLS key", os.path.abspath(key)),
        ("server secret", os.path.abspath(os.path.join(config.state_dir, SECRET_FILE))),
    ]


def check_secret_files(config: Config) -> None:
    """Raise ``InsecureFile`` when "others" may read or write the users file or TLS key.

    A missing file passes: popserv creates it private, or reports it when loading it.
    Group permissions are allowed (e.g. a key readable by an ``ssl-cert`` group).
    """
    for what, path in secret_files(config):
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o007:
            raise InsecureFile(
                f"{path}: the {what} has mode {mode:04o}, so any user of this machine can "
                f"{'read' if mode & 0o004 else 'use'} it; popserv refuses to start until "
                f"you run: chmod o-rwx {path}  (for example chmod 600 {path})"
            )


def raise_file_limit(resource_module=resource, cap: int = FILE_LIMIT) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (at most ``cap``); (before, after)."""
    soft, hard = resource_module.getrlimit(resource_module.RLIMIT_NOFILE)
    wanted = cap if hard == resource_module.RLIM_INFINITY else min(hard, cap)
    if soft != resource_module.RLIM_INFINITY and soft < wanted:
        resource_module.setrlimit(resource_module.RLIMIT_NOFILE, (wanted, hard))
        return soft, wanted
    return soft, soft


class ProcessSetup(Service):
    """Checks and limits before binding; after binding, root becomes ``user`` (if set).

    ``owned``: paths this start created (as root), given to ``user`` before the switch
    so the server can still use them.
    """

    name = "process-setup"
    os = os
    pwd = pwd
    resource = resource

    def __init__(self, config: Config, owned: list[str] = ()):
        self.config = config
        self.owned = list(owned)

    def privilegedStartService(self) -> None:
        check_secret_files(self.config)
        before, after = raise_file_limit(self.resource)
        log.info(
            "popserv.file_limit: {after} open files allowed (was {before})",
            before=before,
            after=after,
        )
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        user = self.config.user
        if not user:
            return
        if self.os.geteuid() != 0:
            # twistd --uid already switched, or the server never ran as root.
            name = self.pwd.getpwuid(self.os.geteuid()).pw_name
            if name != user:
                log.warn(  # noqa: G010 (twisted.logger has no warning())
                    "popserv.privileges: not root, so staying {current} instead of "
                    "becoming [server] user {user}",
                    current=name,
                    user=user,
                )
            return
        self.become(user)

    def become(self, user: str) -> None:
        """Give ``owned`` to ``user``, then switch groups, group and user, in that order."""
        entry = self.pwd.getpwnam(user)
        for path in self.owned:
            self.os.chown(path, entry.pw_uid, entry.pw_gid)
        self.os.initgroups(entry.pw_name, entry.pw_gid)
        self.os.setgid(entry.pw_gid)
        self.os.setuid(entry.pw_uid)
        if self.os.getuid() != entry.pw_uid or self.os.geteuid() != entry.pw_uid:
            raise RuntimeError(f"could not become user {user}")
        log.info(
            "popserv.privileges: running as {user} (uid {uid}, gid {gid})",
            user=user,
            uid=entry.pw_uid,
            gid=entry.pw_gid,
        )


def check_user(config: Config) -> None:
    """Raise ``ConfigError`` when ``[server] user`` names no account of this machine."""
    if config.user:
        try:
            pwd.getpwnam(config.user)
        except KeyError:
            raise ConfigError(
                f"[server] user = {config.user}: no such user on this machine "
                "(create it, e.g. useradd --system popserv, or leave the key empty)"
            ) from None


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (it may belong to another user):
    what the shared state of workers and nodes asks before it forgets a process's rows."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
