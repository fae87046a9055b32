"""The ``popserv`` admin command: add and remove users, set passwords, make a certificate,
see who is logged in.

It edits the users file that the server re-reads on change, or with ``[cluster] database``
the ``popserv_users`` table every node follows (``popserv.pgusers``), so no restart is
needed.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import shutil
import stat
import sys
import unicodedata
from collections.abc import Iterable, Iterator, Sequence

from popserv import __version__, auth, usernames
from popserv.config import Config, ConfigError, config_to_string, parse_config_file, read_config
from popserv.hostname import fqdn
from popserv.interfaces import QuotaLimits
from popserv.preflight import Account, owner_for_new_files

SCHEMES = auth.MAKEABLE


class AdminError(Exception):
    """An expected failure, shown as ``popserv: <message>`` with exit status 1."""


def _config(args: argparse.Namespace) -> Config:
    """The settings the command works with: --config or the defaults, then --users/--mailroot."""
    # An explicit hostname spares Config the FQDN lookup; only paths and user matter here.
    config = read_config(args.config) if args.config else Config(hostname="localhost")
    return config.replace(
        users=args.users or config.users, mailroot=args.mailroot or config.mailroot
    )


class _Users:
    """Where a command finds the users: the users file, or ``[cluster] database``.

    With a database in the configuration (and no --users naming a file instead), the
    users are the rows of ``popserv_users``, which every node follows within a second.
    """

    def __init__(self, config: Config, database=None):
        self.config = config
        self.database = database

    def read(self):
        """The users as they are now: a ``UsersFile`` or a ``UsersTable``, to look at."""
        if self.database is None:
            return auth.UsersFile.read(self.config.users)
        from popserv.pgusers import UsersTable

        return UsersTable.read(self.database)

    def edit(self):
        """The users for one read-modify-write, held against other writers until it ends."""
        if self.database is None:
            return _edit(self.config.users)
        from popserv.pgusers import UsersTable

        return UsersTable.locked(self.database)

    def userdb(self):
        """An ``IUserDB`` of these users, for lookups (no password checks)."""
        if self.database is None:
            return auth.PasswdFile(self.config.users)
        from popserv.pgusers import DatabaseUsers

        userdb = DatabaseUsers(self.database, None)
        userdb.load()
        return userdb


@contextlib.contextmanager
def _users(args: argparse.Namespace) -> Iterator[_Users]:
    """The command's users (``_Users``); a database it opened is closed at the end."""
    config = _config(args)
    if not config.cluster_database or args.users:
        yield _Users(config)
        return
    from popserv.pgdb import DatabaseUnavailable, open_database

    try:
        # A connection of its own (no pool before a server starts): libpq's reason, first
        # line, is the message to show.
        database = open_database(config.cluster_database)
    except DatabaseUnavailable as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdminError(f"[cluster] database: {reason}") from None
    try:
        yield _Users(config, database)
    except DatabaseUnavailable as e:
        raise AdminError(f"[cluster] database: {e}") from None
    finally:
        database.stop()


@contextlib.contextmanager
def _edit(path: str) -> Iterator[auth.UsersFile]:
    """The users file, read under its lock for one read-modify-write, and made private.

    Like the server, which refuses to start while others may read or change the file,
    the edit takes those permissions away, and says so.
    """
    with auth.UsersFile.locked(path) as users:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0
        if mode & 0o007:
            os.chmod(path, mode & ~0o007)
            print(
                f"{path}: the users file had mode {mode:04o}, open to every user of this"
                f" machine; changed it to {mode & ~0o007:04o}"
            )
        yield users


def _make_maildir(mailroot: str, user: str, owner: Account | None) -> str:
    """Create ``user``'s Maildir; what is new goes to ``owner`` (the server's user), if any."""
    store = _store(mailroot)
    path = store.path_for(user)
    missing = [path] if not os.path.isdir(path) else []
    parent = os.path.dirname(path)
    while missing and not os.path.isdir(parent) and parent != os.path.dirname(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    subs = [os.path.join(path, sub) for sub in ("cur", "new", "tmp")]
    missing += [sub for sub in subs if not os.path.isdir(sub)]
    store.create(user)
    if owner is not None:
        for directory in missing:
            os.chown(directory, owner.uid, owner.gid)
    return path


def _store(mailroot: str):
    from popserv.maildir import MaildirStore

    return MaildirStore(mailroot)


def check_user_name(user: str, mailroot: str) -> None:
    """Refuse a name the users file or the Maildir store cannot hold."""
    if not user:
        raise AdminError("the user name is empty")
    try:
        user.encode("utf-8")
    except UnicodeEncodeError:
        raise AdminError(f"user name {user!r} is not valid UTF-8") from None
    if user.startswith("#"):
        raise AdminError(f"user name {user!r} starts with '#' (a comment in the users file)")
    for c in user:
        if c == ":" or c.isspace() or unicodedata.category(c) == "Cc":
            raise AdminError(f"user name {user!r} contains {c!r}")
    try:
        _store(mailroot).path_for(user)
    except ValueError as e:
        raise AdminError(str(e)) from None


def collision_of(user: str, others: Iterable[str]) -> tuple[str, str] | None:
    """The first of ``others`` whose Maildir would meet ``user``'s, and how; None if none."""
    for collision in usernames.find_collisions([*others, user]):
        if user not in (collision.user, collision.other):
            continue  # an older clash in the file, which the server refuses
        other = collision.other if user == collision.user else collision.user
        if not collision.nested:
            how = "both would use one Maildir"
        elif user == collision.user:
            how = "its Maildir would lie inside the other's"
        else:
            how = "the other's Maildir would lie inside its own"
        inner, outer = usernames.user_parts(collision.user), usernames.user_parts(collision.other)
        if not collision.nested or inner[: len(outer)] != outer:
            how += " (names are compared ignoring case)"
        return other, how
    return None


def check_lower_case_domain(user: str) -> None:
    """Refuse ``alice@Example.ORG``: SMTP looks domains up in lower case, so mail would miss it."""
    local, at, domain = user.rpartition("@")
    if at and domain != domain.lower():
        raise AdminError(
            f"user {user!r}: write the domain in lower case, {local}@{domain.lower()}"
            " (domains are case-insensitive)"
        )


def read_password(from_stdin: bool) -> bytes:
    """One line of stdin, or a prompt asked twice; an empty password is refused."""
    if from_stdin:
        stream = getattr(sys.stdin, "buffer", sys.stdin)
        line = stream.readline()
        if isinstance(line, str):
            line = line.encode("utf-8", "surrogateescape")
        password = line.removesuffix(b"\n").removesuffix(b"\r")
    else:
        try:
            first = getpass.getpass("Password: ")
            second = getpass.getpass("Retype password: ")
        except EOFError:
            raise AdminError("no password given") from None
        if first != second:
            raise AdminError("the passwords do not match")
        password = first.encode("utf-8", "surrogateescape")
    if not password:
        raise AdminError("the password is empty")
    return password


def _password_field(args: argparse.Namespace) -> str:
    password = read_password(args.password_stdin)
    try:
        return auth.hash_password(password, args.scheme)
    except ValueError as e:
        raise AdminError(str(e)) from None


def _require_user(users, user: str) -> None:
    if users.get(user) is None:
        raise AdminError(f"no such user: {user!r} in {users.path}")


def _quota_rule(args: argparse.Namespace, entry: auth.Entry | None) -> str | None:
    """The ``quota_rule`` field ``--quota``/``--quota-messages`` ask for, from the entry's.

    ``default``: no rule of the user's own (the ``[quota]`` defaults apply).  Returns
    the current field when neither option is given.
    """
    from popserv.quota import format_rule, parse_rule, parse_size

    current = entry.fields.get("quota_rule") if entry is not None else None
    storage, messages = args.quota, args.quota_messages
    if storage is None and messages is None:
        return current
    if storage is not None and storage.lower() == "default":
        if messages is not None:
            raise AdminError("--quota default clears the user's rule; leave out --quota-messages")
        return None
    try:
        limits = parse_rule(current) if current else QuotaLimits()
        if storage is not None:
            limits = limits._replace(storage=parse_size(storage))
        if messages is not None:
            limits = limits._replace(messages=messages)
    except ValueError as e:
        raise AdminError(str(e)) from None
    return format_rule(limits)


def _set_quota(users, user: str, rule: str | None) -> None:
    users.set_field(user, "quota_rule", rule)


def _check_new_user(users, user: str) -> None:
    if users.get(user) is not None:
        raise AdminError(f"user {user!r} already exists in {users.path}")
    clash = collision_of(user, users.users())
    if clash is not None:
        other, how = clash
        raise AdminError(f"user {user!r} collides with user {other!r}: {how}")


def adduser(args: argparse.Namespace) -> None:
    """Add a user with a hashed password, and create the user's Maildir.

    The checks run once before the password is asked and hashed, and again under the
    lock, which is held only for the edit itself.
    """
    with _users(args) as source:
        config = source.config
        check_user_name(args.user, config.mailroot)
        _check_new_user(source.read(), args.user)
        check_lower_case_domain(args.user)
        rule = _quota_rule(args, None)
        owner = owner_for_new_files(config)
        field = _password_field(args)
        with source.edit() as users:
            _check_new_user(users, args.user)
            path = _make_maildir(config.mailroot, args.user, owner)
            users.add(args.user, field)
            if rule is not None:
                _set_quota(users, args.user, rule)
            users.write(owner=(owner.uid, owner.gid) if owner is not None else None)
    owned = f", owned by {owner.name}" if owner is not None else ""
    quota = f", quota {rule}" if rule is not None else ""
    print(f"added user {args.user} (Maildir {path}{owned}{quota})")


def passwd(args: argparse.Namespace) -> None:
    """Replace a user's password hash, keeping the line's other fields."""
    with _users(args) as source:
        _require_user(source.read(), args.user)
        field = _password_field(args)
        with source.edit() as users:
            _require_user(users, args.user)
            rule = _quota_rule(args, users.get(args.user))
            users.set_password(args.user, field)
            _set_quota(users, args.user, rule)
            users.write()
    print(f"password changed for {args.user}")


def deluser(args: argparse.Namespace) -> None:
    """Remove a user's line; the Maildir stays unless --remove-mail."""
    with _users(args) as source, source.edit() as users:
        mailroot = source.config.mailroot
        _require_user(users, args.user)
        others = [user for user in users.users() if user != args.user]
        clash = collision_of(args.user, others) if args.remove_mail else None
        if clash is not None:
            raise AdminError(
                f"not removing the Maildir of {args.user!r}: user {clash[0]!r} reaches the"
                " same files; remove the user without --remove-mail"
            )
        users.remove(args.user)
        users.write()
    try:
        path = _store(mailroot).path_for(args.user)
    except ValueError:
        path = None  # a name the store refuses has no Maildir
    if not args.remove_mail or path is None or not os.path.isdir(path):
        kept = f" (Maildir {path} kept)" if path is not None and os.path.isdir(path) else ""
        print(f"removed user {args.user}{kept}")
        return
    shutil.rmtree(path)
    print(f"removed user {args.user} and the Maildir {path}")


def _usages(source: _Users, names: Sequence[str] | None = None):
    """(user, Usage) for the users named, or all (in file order, or by name from a table);
    counted without writing."""
    from popserv.policy import MailboxPolicies
    from popserv.quota import Usage, usage

    config = source.config
    policies = MailboxPolicies(source.userdb(), config)
    store = _store(config.mailroot)
    for user in names if names is not None else source.read().users():
        limits = policies.for_user(user).quota
        try:
            maildir = store.path_for(user)
        except ValueError:
            maildir = None
        if maildir is None or not os.path.isdir(maildir):
            yield user, Usage(0, 0, limits)
        else:
            yield user, usage(maildir, limits, write=False)


def _limit_text(limit: int) -> str:
    return str(limit) if limit else "-"


def list_users(args: argparse.Namespace) -> None:
    """Print each user, tab-separated with usage and limits: bytes, messages, both limits.

    A missing users file is an error (not so an empty table).
    """
    with _users(args) as source:
        users_path = source.config.users
        if source.database is None and not os.path.exists(users_path):
            raise AdminError(f"{users_path}: no such users file (popserv adduser creates it)")
        for user, used in _usages(source):
            storage, messages = used.limits
            row = [user, str(used.bytes), str(used.messages)]
            print("\t".join(row + [_limit_text(storage), _limit_text(messages)]))


def show_quota(args: argparse.Namespace) -> None:
    """Print a user's usage and limits; with --quota/--quota-messages, set the limit first."""
    with _users(args) as source:
        if args.quota is not None or args.quota_messages is not None:
            with source.edit() as users:
                _require_user(users, args.user)
                rule = _quota_rule(args, users.get(args.user))
                _set_quota(users, args.user, rule)
                users.write()
            print(f"quota of {args.user} set to {rule or 'the default'}")
        else:
            _require_user(source.read(), args.user)
        ((user, used),) = _usages(source, [args.user])
    storage, messages = used.limits
    percent = f" ({100 * used.bytes // storage}%)" if storage else ""
    print(f"user: {user}")
    print(f"storage: {used.bytes} bytes of {storage or 'no limit'}{percent}")
    print(f"messages: {used.messages} of {messages or 'no limit'}")


def import_users(args: argparse.Namespace) -> None:
    """Load a Dovecot passwd-file into ``[cluster] database``: new users added, known ones
    replaced (password and other fields), none removed.

    Lines the server would not serve are skipped, each reported with its reason: no
    ``user:password``, a name popserv refuses, a second entry for a name, a name whose
    Maildir would meet another user's.  Users whose scheme popserv cannot verify are
    imported, and named.
    """
    from popserv.pgusers import import_entries

    os.stat(args.file)  # a missing file is an error, not an empty import
    with _users(args) as source:
        if source.database is None:
            raise AdminError(
                "import-users loads a passwd-file into [cluster] database, and the"
                " configuration names none (without it, the users file is a passwd-file)"
            )
        existing = set(source.read().users())
        entries, skipped = _importable(args.file, source.config.mailroot, existing)
        added, updated, unchanged = source.database.call(import_entries, entries.values())
    for number, reason in sorted(skipped):
        print(f"{args.file}:{number}: skipped: {reason}")
    print(
        f"imported {args.file}: {added} added, {updated} updated, {unchanged} unchanged,"
        f" {len(skipped)} skipped"
    )
    unknown: dict[str, list[str]] = {}
    for entry in entries.values():
        scheme = auth.split_scheme(entry.password)[0]
        if scheme not in auth.VERIFIABLE:
            unknown.setdefault(scheme, []).append(entry.user)
    for scheme, names in sorted(unknown.items()):
        print(
            f"note: popserv cannot verify {scheme} passwords; these users cannot log in"
            f" until given a new one (popserv passwd): {', '.join(names)}"
        )


def _importable(
    path: str, mailroot: str, existing: set[str]
) -> tuple[dict[str, auth.Entry], list[tuple[int, str]]]:
    """The entries of a passwd-file worth importing, and (line number, reason) for the rest."""
    entries: dict[str, auth.Entry] = {}
    numbers: dict[str, int] = {}
    skipped: list[tuple[int, str]] = []
    for number, line in enumerate(auth.UsersFile.read(path).lines, 1):
        if not isinstance(line, auth.Entry):
            if line.strip() and not line.lstrip().startswith("#"):
                skipped.append((number, "not a 'user:password' line"))
            continue
        if line.user in entries:
            skipped.append(
                (number, f"a second entry for {line.user!r} (line {numbers[line.user]})")
            )
            continue
        try:
            check_user_name(line.user, mailroot)
            check_lower_case_domain(line.user)
        except AdminError as e:
            skipped.append((number, str(e)))
            continue
        entries[line.user] = line
        numbers[line.user] = number
    # A new name that would share files with another user's is left out; of two new
    # ones, the later line.  (Old clashes in the table stay the server's to refuse.)
    names = [*existing, *(user for user in entries if user not in existing)]
    dropped: set[str] = set()
    for collision in usernames.find_collisions(names):
        pair = (collision.user, collision.other)
        new = [user for user in pair if user in entries and user not in existing]
        if not new or dropped.intersection(pair):
            continue
        user = max(new, key=numbers.__getitem__)
        other = pair[1] if user == pair[0] else pair[0]
        how = collision_of(user, [other])[1]
        dropped.add(user)
        skipped.append((numbers[user], f"user {user!r} collides with user {other!r}: {how}"))
    for user in dropped:
        del entries[user]
    return entries, skipped


def gencert(args: argparse.Namespace) -> None:
    """Make a self-signed certificate and key; print their paths and SHA-256 fingerprint."""
    from popserv import tls

    config = read_config(args.config) if args.config else None
    hostname = args.hostname or (config.hostname if config else fqdn())
    directory = os.path.abspath(
        args.dir or (config or Config(hostname=hostname)).tls_self_signed_dir
    )
    for path in tls.self_signed_paths(directory):
        if os.path.exists(path) and not args.force:
            raise AdminError(f"{path} already exists; pass --force to replace it")
    cert_path, key_path = tls.generate_self_signed(hostname, directory)
    print(f"certificate: {cert_path}")
    print(f"key: {key_path}")
    print(f"SHA-256 fingerprint: {tls.fingerprint(cert_path)}")


def check(args: argparse.Namespace) -> int:
    """Validate what the server would read; print every problem, or the effective settings.

    Like ``doveconf -n`` and ``postfix check``: nothing is bound or changed, so it runs
    beside a live server.
    """
    from popserv.preflight import server_problems

    if args.config:
        config, problems = parse_config_file(args.config)
    else:
        config, problems = Config(), []
    problems += server_problems(config, args.user)
    for problem in problems:
        print(f"popserv: {problem}", file=sys.stderr)
    if problems:
        return 1
    source = args.config or "built-in defaults"
    print(f"# popserv {__version__}: {source}, no problems found")
    print(config_to_string(config, only_changed=args.n), end="")
    return 0


def who(args: argparse.Namespace) -> None:
    """List the logged-in POP3 sessions of the servers that use the state directory.

    Each running server answers on its own socket in ``<state_dir>/who``; those of
    servers that are gone are removed.  A server that does not answer is reported
    after the others are listed, and the exit status is 1.  With ``[cluster] database``
    (and no ``--state-dir``) the list is every node's, from the database.
    """
    from datetime import datetime

    from popserv.sessions import WHO_DIR, read_sessions

    config = read_config(args.config) if args.config else Config(hostname="localhost")
    if config.cluster_database and not args.state_dir:
        sessions, problems = _cluster_sessions(config), []
    else:
        state_dir = args.state_dir or config.state_dir
        directory = os.path.join(state_dir, WHO_DIR)
        if not os.path.isdir(directory):
            raise AdminError(
                f"no {directory}: no server has run with the state directory {state_dir}"
                " (give the server's --config, or --state-dir)"
            )
        sessions, problems = read_sessions(directory)
    rows = [
        {
            "user": s.user,
            "address": s.peer,
            "since": datetime.fromtimestamp(s.since).astimezone().isoformat(timespec="seconds"),
            "pid": s.pid,
            "node": s.node,
        }
        for s in sorted(sessions, key=lambda s: (s.since, s.user))
    ]
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
    else:
        columns = ["user", "address", "since", "pid", "node"]
        table = [[c.upper() for c in columns]] + [[str(r[c]) for c in columns] for r in rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
        for line in table:
            print(
                "  ".join(
                    cell.ljust(width) for cell, width in zip(line, widths, strict=True)
                ).rstrip()
            )
    if problems:
        raise AdminError("; ".join(problems))


def _cluster_sessions(config: Config) -> list:
    """Every node's sessions, from ``[cluster] database``."""
    from popserv.pgdb import DatabaseUnavailable
    from popserv.pgstate import read_cluster_sessions

    try:
        return read_cluster_sessions(config.cluster_database)
    except DatabaseUnavailable as e:
        raise AdminError(f"[cluster] database: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per action, each with the path options."""
    paths = argparse.ArgumentParser(add_help=False)
    paths.add_argument("--config", metavar="FILE", help="read users and mailroot from FILE")
    paths.add_argument("--users", metavar="FILE", help="the users file (overrides --config)")
    paths.add_argument("--mailroot", metavar="DIR", help="the Maildir root (overrides --config)")

    password = argparse.ArgumentParser(add_help=False)
    password.add_argument(
        "--password-stdin", action="store_true", help="read the password from one line of stdin"
    )
    password.add_argument(
        "--scheme",
        type=str.upper,
        choices=SCHEMES,
        default="ARGON2ID",
        metavar="SCHEME",
        help="password scheme: " + ", ".join(SCHEMES) + " (default: ARGON2ID)",
    )

    parser = argparse.ArgumentParser(
        prog="popserv", description="Manage popserv's users and TLS certificate."
    )
    parser.add_argument("--version", action="version", version=f"popserv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    limits = argparse.ArgumentParser(add_help=False)
    limits.add_argument(
        "--quota",
        metavar="SIZE",
        help="the user's storage limit, such as 100M (0: none; 'default': the [quota] one)",
    )
    limits.add_argument(
        "--quota-messages", type=int, metavar="N", help="the user's message limit (0: none)"
    )

    add = commands.add_parser("adduser", parents=[paths, password, limits], help="add a user")
    add.add_argument("user")
    add.set_defaults(run=adduser)

    change = commands.add_parser("passwd", parents=[paths, password, limits], help="set a password")
    change.add_argument("user")
    change.set_defaults(run=passwd)

    remove = commands.add_parser("deluser", parents=[paths], help="remove a user")
    remove.add_argument("user")
    remove.add_argument("--remove-mail", action="store_true", help="also delete the Maildir")
    remove.set_defaults(run=deluser)

    show = commands.add_parser("list", parents=[paths], help="list the users and their usage")
    show.set_defaults(run=list_users)

    usage = commands.add_parser(
        "quota", parents=[paths, limits], help="show (or set) a user's quota and usage"
    )
    usage.add_argument("user")
    usage.set_defaults(run=show_quota)

    load = commands.add_parser(
        "import-users",
        help="load a Dovecot passwd-file into [cluster] database (adding or replacing users)",
    )
    load.add_argument("file", metavar="FILE", help="the passwd-file (user:{SCHEME}hash:...)")
    load.add_argument("--config", metavar="FILE", help="the configuration naming the database")
    load.add_argument("--mailroot", metavar="DIR", help="the Maildir root (overrides --config)")
    load.set_defaults(run=import_users, users=None)

    cert = commands.add_parser(
        "gencert", help="make a self-signed TLS certificate for the host name"
    )
    cert.add_argument("--config", metavar="FILE", help="take host name and directory from FILE")
    cert.add_argument(
        "--hostname", metavar="NAME", help="name the certificate is for (default: hostname -f)"
    )
    cert.add_argument("--dir", metavar="DIR", help="where to write cert.pem and key.pem")
    cert.add_argument("--force", action="store_true", help="replace an existing pair")
    cert.set_defaults(run=gencert)
    verify = commands.add_parser(
        "check", help="check a configuration and the files it names, then print its settings"
    )
    verify.add_argument("--config", metavar="FILE", help="the configuration to check")
    verify.add_argument(
        "-n", action="store_true", help="print only the settings that differ from the defaults"
    )
    verify.add_argument(
        "--user",
        metavar="NAME",
        help="check file access as NAME (e.g. the unit's User=) instead of [server] user",
    )
    verify.set_defaults(run=check)

    sessions = commands.add_parser(
        "who", parents=[paths], help="list the logged-in POP3 sessions of running servers"
    )
    sessions.add_argument(
        "--state-dir", metavar="DIR", help="the server's state directory (overrides --config)"
    )
    sessions.add_argument("--json", action="store_true", help="print a JSON list instead")
    sessions.set_defaults(run=who)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one admin command; the exit status is 0, 1 for an error, 2 for bad usage."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage error or the help
        return e.code if isinstance(e.code, int) else 2
    try:
        status = args.run(args)
    except (AdminError, ConfigError) as e:
        print(f"popserv: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"popserv: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    raise SystemExit(main())
