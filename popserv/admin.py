"""The ``popserv`` admin command: add and remove users, set passwords, make a certificate,
see who is logged in.

It edits the users file that the server re-reads on change, so no restart is needed.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import socket
import sys
import unicodedata
from collections.abc import Iterable, Sequence

from popserv import auth, usernames
from popserv.config import Config, ConfigError, read_config

SCHEMES = auth.MAKEABLE


class AdminError(Exception):
    """An expected failure, shown as ``popserv: <message>`` with exit status 1."""


def _paths(args: argparse.Namespace) -> tuple[str, str]:
    """The users file and mail root: from --config or the defaults, then --users/--mailroot."""
    # An explicit hostname spares Config the FQDN lookup; only the paths matter here.
    config = read_config(args.config) if args.config else Config(hostname="localhost")
    return args.users or config.users, args.mailroot or config.mailroot


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


def _require_user(users: auth.UsersFile, user: str) -> None:
    if users.get(user) is None:
        raise AdminError(f"no such user: {user!r} in {users.path}")


def adduser(args: argparse.Namespace) -> None:
    """Add a user with a hashed password, and create the user's Maildir."""
    users_path, mailroot = _paths(args)
    users = auth.UsersFile.read(users_path)
    check_user_name(args.user, mailroot)
    if users.get(args.user) is not None:
        raise AdminError(f"user {args.user!r} already exists in {users_path}")
    clash = collision_of(args.user, users.users())
    if clash is not None:
        other, how = clash
        raise AdminError(f"user {args.user!r} collides with user {other!r}: {how}")
    check_lower_case_domain(args.user)
    field = _password_field(args)
    _store(mailroot).create(args.user)
    users.add(args.user, field)
    users.write()


def passwd(args: argparse.Namespace) -> None:
    """Replace a user's password hash, keeping the line's other fields."""
    users_path, _ = _paths(args)
    users = auth.UsersFile.read(users_path)
    _require_user(users, args.user)
    users.set_password(args.user, _password_field(args))
    users.write()


def deluser(args: argparse.Namespace) -> None:
    """Remove a user's line; the Maildir stays unless --remove-mail."""
    users_path, mailroot = _paths(args)
    users = auth.UsersFile.read(users_path)
    _require_user(users, args.user)
    others = [user for user in users.users() if user != args.user]
    clash = collision_of(args.user, others) if args.remove_mail else None
    if clash is not None:
        raise AdminError(
            f"not removing the Maildir of {args.user!r}: user {clash[0]!r} reaches the same"
            " files; remove the user without --remove-mail"
        )
    users.remove(args.user)
    users.write()
    if args.remove_mail:
        try:
            path = _store(mailroot).path_for(args.user)
        except ValueError:
            return  # a name the store refuses has no Maildir
        if os.path.isdir(path):
            shutil.rmtree(path)


def list_users(args: argparse.Namespace) -> None:
    """Print the user names, one per line, in file order."""
    users_path, _ = _paths(args)
    for user in auth.UsersFile.read(users_path).users():
        print(user)


def gencert(args: argparse.Namespace) -> None:
    """Make a self-signed certificate and key; print their paths and SHA-256 fingerprint."""
    from popserv import tls

    config = read_config(args.config) if args.config else None
    hostname = args.hostname or (config.hostname if config else socket.getfqdn())
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


def who(args: argparse.Namespace) -> None:
    """List the logged-in POP3 sessions of the servers that use the state directory.

    Each running server answers on its own socket in ``<state_dir>/who``; those of
    servers that are gone are removed.  A server that does not answer is reported
    after the others are listed, and the exit status is 1.
    """
    from datetime import datetime

    from popserv.sessions import WHO_DIR, read_sessions

    config = read_config(args.config) if args.config else Config(hostname="localhost")
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
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add = commands.add_parser("adduser", parents=[paths, password], help="add a user")
    add.add_argument("user")
    add.set_defaults(run=adduser)

    change = commands.add_parser("passwd", parents=[paths, password], help="set a password")
    change.add_argument("user")
    change.set_defaults(run=passwd)

    remove = commands.add_parser("deluser", parents=[paths], help="remove a user")
    remove.add_argument("user")
    remove.add_argument("--remove-mail", action="store_true", help="also delete the Maildir")
    remove.set_defaults(run=deluser)

    show = commands.add_parser("list", parents=[paths], help="list the users")
    show.set_defaults(run=list_users)

    cert = commands.add_parser(
        "gencert", help="make a self-signed TLS certificate for the host name"
    )
    cert.add_argument("--config", metavar="FILE", help="take host name and directory from FILE")
    cert.add_argument("--hostname", metavar="NAME", help="name the certificate is for")
    cert.add_argument("--dir", metavar="DIR", help="where to write cert.pem and key.pem")
    cert.add_argument("--force", action="store_true", help="replace an existing pair")
    cert.set_defaults(run=gencert)

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
        args.run(args)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
