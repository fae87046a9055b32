"""What must be true before the server starts, checked without starting it.

Above all: the user the server runs as can use the mail root, its Maildirs and the users
file.  ``twistd popserv`` asks that before it starts (and before twistd daemonizes), the
admin commands ask whom to give what they create, and ``popserv check`` asks it along
with the rest (listeners, certificate and key, the users file's mode and names).  Each
problem is one line naming the path or key and the fix, found before the first login
answers ``-ERR [SYS/TEMP]``.  Permissions are read from the mode bits (an ACL counts as
allowing), so no process has to switch users to find out.
"""

from __future__ import annotations

import os
import pwd
import stat
import sys
from dataclasses import dataclass

from popserv.config import Config, ConfigError

_READ, _WRITE, _ENTER = 4, 2, 1
_USE = _READ | _WRITE | _ENTER


@dataclass(frozen=True)
class Account:
    """A user the server runs as: its name, uid, primary gid and every group it is in."""

    name: str
    uid: int
    gid: int
    groups: frozenset[int]

    @classmethod
    def of(cls, entry: pwd.struct_passwd) -> Account:
        groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, frozenset(groups))

    @classmethod
    def with_name(cls, name: str) -> Account:
        """The account called ``name``; KeyError if this machine has none."""
        return cls.of(pwd.getpwnam(name))

    @classmethod
    def named(cls, name: str) -> Account:
        """The account ``[server] user`` names; ConfigError if this machine has none."""
        try:
            return cls.with_name(name)
        except KeyError:
            raise ConfigError(
                f"[server] user = {name}: no such user on this machine "
                "(create it, e.g. useradd --system popserv, or leave the key empty)"
            ) from None

    @classmethod
    def with_uid(cls, uid: int) -> Account:
        """The account of ``uid``; one without a passwd entry has only its own group."""
        try:
            return cls.of(pwd.getpwuid(uid))
        except KeyError:
            return cls(str(uid), uid, uid, frozenset([uid]))


def server_account(config: Config, twistd_uid: int | None = None) -> Account:
    """Who the server will run as: ``twistd --uid``, else ``[server] user`` when started
    as root (popserv switches to it), else the user starting it."""
    if twistd_uid is not None:
        return Account.with_uid(twistd_uid)
    if config.user and os.geteuid() == 0:
        return Account.named(config.user)
    return Account.with_uid(os.geteuid())


def owner_for_new_files(config: Config) -> Account | None:
    """Whom root's admin commands give what they create: ``[server] user``, else the
    non-root owner of the mail root; None to keep what they make as it is."""
    if os.geteuid() != 0:
        return None
    if config.user:
        return Account.named(config.user)
    try:
        uid = os.stat(config.mailroot).st_uid
    except OSError:
        return None
    return Account.with_uid(uid) if uid != 0 else None


def _has_acl(path: str) -> bool:
    try:
        os.getxattr(path, "system.posix_acl_access")
    except OSError:
        return False
    return True


def _allows(account: Account, path: str, st: os.stat_result, wanted: int) -> bool:
    """Whether the mode bits give ``account`` every access in ``wanted`` (r=4, w=2, x=1)."""
    if account.uid == 0:
        return True
    if st.st_uid == account.uid:
        granted = st.st_mode >> 6
    elif st.st_gid in account.groups:
        granted = st.st_mode >> 3
    else:
        granted = st.st_mode
    return granted & wanted == wanted or _has_acl(path)


def _describe(path: str, st: os.stat_result) -> str:
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    return f"owner {owner}, mode {stat.S_IMODE(st.st_mode):04o}"


def _verbs(wanted: int) -> str:
    bits = ((_READ, "read"), (_WRITE, "write"), (_ENTER, "enter"))
    return "/".join(name for bit, name in bits if wanted & bit)


def _ancestors(path: str) -> list[str]:
    """The directories above ``path``, from the root down."""
    parts = path.split(os.sep)
    return [os.sep.join(parts[:depth]) or os.sep for depth in range(1, len(parts))]


@dataclass(frozen=True)
class Start:
    """Who the server runs as, who creates missing paths, and whether it hands them over."""

    account: Account
    creator: Account
    gives_created: bool  # root creates them and gives them to ``account`` (``[server] user``)


def start_of(config: Config, twistd_uid: int | None = None) -> Start:
    """How ``twistd popserv`` would start here (``twistd_uid``: its ``--uid``)."""
    account = server_account(config, twistd_uid)
    creator = Account.with_uid(os.geteuid())
    gives = creator.uid == 0 and twistd_uid is None and bool(config.user)
    return Start(account, creator, gives)


def _path_problem(start: Start, path: str, wanted: int, what: str, fix: str) -> str | None:
    """Why the server's user cannot use ``path`` as ``wanted``, or None.

    Every directory above it must let the user in; the path itself must allow
    ``wanted``, or, when missing, be one the start creates in a way the user can use.
    """
    try:
        return _usable(start, os.path.abspath(path), wanted, what, fix)
    except OSError as e:
        return f"{e.filename or path}: cannot check the {what}: {e.strerror}"


def _usable(start: Start, path: str, wanted: int, what: str, fix: str) -> str | None:
    account = start.account
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    for parent in [*_ancestors(existing), *([existing] if existing != path else [])]:
        st = os.stat(parent)
        if not _allows(account, parent, st, _ENTER):
            return (
                f"{path}: user {account.name} cannot enter {parent} ({_describe(parent, st)}),"
                f" so it cannot reach the {what}; fix: chmod o+x {parent}, or move the {what}"
            )
    st = os.stat(existing)
    if existing == path:
        if _allows(account, path, st, wanted):
            return None
        return (
            f"{path}: user {account.name} cannot {_verbs(wanted)} the {what} "
            f"({_describe(path, st)}); fix: {fix}"
        )
    if start.gives_created:
        return None
    if start.creator.uid != account.uid:
        return (
            f"{path}: the {what} does not exist; {start.creator.name} would create it at"
            f" start, and user {account.name} could not use it; fix: create it and"
            f" chown {account.name}: {path}"
        )
    if not _allows(account, existing, st, _WRITE | _ENTER):
        return (
            f"{path}: user {account.name} cannot create the {what} in {existing}"
            f" ({_describe(existing, st)}); fix: create it and chown {account.name}: {path}"
        )
    return None


def _maildir_problem(start: Start, config: Config) -> str | None:
    """The first Maildir of a listed user that the server's user cannot use, and how many."""
    from popserv.auth import UsersFile
    from popserv.usernames import user_parts

    try:
        users = UsersFile.read(config.users).users()
    except OSError:
        return None  # the users file's own check names it
    mailroot = os.path.abspath(config.mailroot)
    bad = []
    for user in users:
        try:
            maildir = os.path.join(mailroot, *user_parts(user))
        except ValueError:
            continue
        paths = [maildir, *(os.path.join(maildir, sub) for sub in ("cur", "new", "tmp"))]
        for path in [*_ancestors(maildir)[len(_ancestors(mailroot)) + 1 :], *paths]:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                break  # made at the first delivery
            if not _allows(start.account, path, st, _USE):
                bad.append(f"{path} ({_describe(path, st)})")
                break
    if not bad:
        return None
    more = f", and {len(bad) - 1} more" if len(bad) > 1 else ""
    return (
        f"{mailroot}: user {start.account.name} cannot use the Maildir {bad[0]}{more}; "
        f"fix: chown -R {start.account.name}: {mailroot}"
    )


def access_problems(config: Config, start: Start) -> list[str]:
    """What the server's user could not use: mail root, Maildirs, users file, its lock."""
    if start.account.uid == 0:
        return []
    from popserv.auth import lock_path

    name = start.account.name
    mailroot = os.path.abspath(config.mailroot)
    users = os.path.abspath(config.users)
    problems = [
        _path_problem(start, mailroot, _USE, "mail root", f"chown -R {name}: {mailroot}"),
        _path_problem(start, users, _READ, "users file", f"chown {name}: {users}"),
    ]
    if problems[0] is None:
        problems.append(_maildir_problem(start, config))
    lock = lock_path(users)
    if problems[1] is None and os.path.exists(lock):
        problems.append(
            _path_problem(start, lock, _READ, "users file's lock", f"chown {name}: {lock}")
        )
    if config.log_file and config.log_max_size:
        # The file is opened before root is dropped, but each rotation renames it and
        # opens a new one as the server's user; Twisted skips a rotation it cannot do.
        folder = os.path.dirname(os.path.abspath(config.log_file))
        problems.append(
            _path_problem(
                start,
                folder,
                _WRITE | _ENTER,
                "[log] file's directory",
                f"chown {name}: {folder}, or set [log] max_size = 0 and rotate with logrotate",
            )
        )
    problems.append(_worker_problem(config, start))
    return [problem for problem in problems if problem is not None]


def _worker_problem(config: Config, start: Start) -> str | None:
    """Why the server's user could not start a worker, or None: each worker is a new
    process of this Python, run as that user, importing this popserv and Twisted."""
    from popserv.supervisor import worker_count

    count = worker_count(config)
    if count < 2 or start.account.uid == os.geteuid():
        return None  # one process, or this very user runs them
    import twisted

    needed = [
        (os.path.realpath(sys.executable), _ENTER, "execute"),
        *(
            (os.path.dirname(os.path.abspath(package.__file__)), _READ | _ENTER, "read")
            for package in (sys.modules["popserv"], twisted)
        ),
    ]
    for target, wanted, verb in needed:
        steps = [*((path, _ENTER, "enter") for path in _ancestors(target)), (target, wanted, verb)]
        for path, bits, what in steps:
            try:
                st = os.stat(path)
            except OSError:
                break
            if not _allows(start.account, path, st, bits):
                return (
                    f"{sys.executable}: user {start.account.name} cannot run the {count} "
                    f"workers ([server] workers): it cannot {what} {path} "
                    f"({_describe(path, st)}); fix: install Python, Twisted and popserv "
                    "where that user can run them, or set [server] workers = 1"
                )
    return None


def check_start(config: Config, twistd_uid: int | None = None) -> None:
    """Raise ConfigError, one line per problem, if the server's user could not use its files."""
    problems = access_problems(config, start_of(config, twistd_uid))
    if problems:
        raise ConfigError("\n".join(problems))


def _listener_problems(config: Config) -> list[str]:
    """Listener strings that make no endpoint (parsed only, nothing is bound)."""
    from popserv.listeners import listener_endpoint

    problems = []
    if not config.pop3_listen:
        problems.append("[pop3] listen: no POP3 listener; give at least one, such as tcp:110")
    for section, descriptions in (
        ("pop3", config.pop3_listen),
        ("pop3s", config.pop3s_listen),
        ("smtp", config.smtp_listen),
    ):
        for description in descriptions:
            if section == "pop3s" and description.split(":", 1)[0].lower() in ("ssl", "tls"):
                problems.append(
                    f"[pop3s] listen = {description}: already TLS; give a plain endpoint "
                    "such as tcp:995, and popserv adds TLS with its certificate"
                )
                continue
            if "systemd:" in description.lower():
                continue  # its sockets exist only in the unit systemd starts
            try:
                # Parsing needs no reactor: the endpoint keeps it for listen(), never called.
                listener_endpoint(None, description)
            except Exception as e:  # endpoint parsers raise ValueError, TypeError, ...
                problems.append(f"[{section}] listen = {description}: not an endpoint: {e}")
    return problems


def _tls_problems(config: Config) -> list[str]:
    """The certificate and key, in the words ``twistd popserv`` stops with."""
    from popserv.tls import CertificateError, check_files

    try:
        check_files(config)
    except CertificateError as e:
        return [str(e)]
    return []


def _private_file_problems(config: Config) -> list[str]:
    """Secret files (users, TLS key, server secret) that other users may read or change."""
    from popserv.process import secret_files

    problems = []
    for what, path in secret_files(config):
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            continue
        if mode & 0o007:
            problems.append(
                f"{path}: the {what} has mode {mode:04o}, open to every user of this "
                f"machine, and popserv refuses to start; fix: chmod o-rwx {path}"
            )
    return problems


def _database_problems(config: Config) -> list[str]:
    """``[cluster] database`` out of reach, or psycopg missing (nothing is written there)."""
    if not config.cluster_database:
        return []
    from popserv.interfaces import SharedStateUnavailable
    from popserv.pgdb import reach_database

    try:
        reach_database(config.cluster_database, upgrade=False)
    except ConfigError as e:
        return [str(e)]
    except SharedStateUnavailable as e:
        return [f"[cluster] database: {' '.join(str(e).split())}"]
    return []


def _users_file_problems(config: Config) -> list[str]:
    """A users file that cannot be read, or names the server would refuse."""
    from popserv.auth import Entry, UsersFile
    from popserv.usernames import find_collisions

    path = os.path.abspath(config.users)
    if not os.path.exists(path):
        return []  # created empty at the first start
    try:
        users = UsersFile.read(path)
    except OSError as e:
        return [f"{path}: cannot read the users file: {e.strerror}"]
    problems = []
    seen = set()
    for number, line in enumerate(users.lines, 1):
        if isinstance(line, Entry):
            if line.user in seen:
                problems.append(f"{path}:{number}: a second entry for {line.user!r}, ignored")
            seen.add(line.user)
        elif line.strip() and not line.lstrip().startswith("#"):
            problems.append(f"{path}:{number}: a line without 'user:password', ignored")
    for user, other, nested in find_collisions(seen):
        relation = "lies inside" if nested else "is"
        problems.append(
            f"{path}: the Maildir of {user!r} {relation} that of {other!r}; the server "
            "refuses both until one is renamed or removed"
        )
    return problems


def server_problems(config: Config, user: str | None = None) -> list[str]:
    """Everything ``twistd popserv`` with ``config`` would stop at or fail on, one line each.

    ``user``: check access as that user (for example a systemd unit's ``User=``), instead
    of the one the server would become (``[server] user``, or whoever runs this).
    """
    from popserv.process import check_user

    problems = _listener_problems(config) + _tls_problems(config)
    problems += _private_file_problems(config) + _users_file_problems(config)
    problems += _database_problems(config)
    try:
        check_user(config)
    except ConfigError as e:
        return [*problems, str(e)]
    if not user:
        return problems + access_problems(config, start_of(config))
    try:
        account = Account.with_name(user)
    except KeyError:
        return [*problems, f"--user {user}: no such user on this machine"]
    return problems + access_problems(config, Start(account, account, gives_created=False))
