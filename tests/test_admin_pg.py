"""The ``popserv`` admin commands with ``[cluster] database``: users in a real PostgreSQL."""

from __future__ import annotations

import io
import os
import sys

import argon2
from twisted.internet import reactor
from twisted.trial import unittest

from popserv import admin, auth, pgusers
from popserv.pgdb import open_database
from popserv.testing import run_at_once
from tests.live_pg import shared_server
from tests.live_smtp import free_port

CHEAP = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def write_config(path: str, **sections: dict[str, str]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for section, keys in sections.items():
            f.write(f"[{section}]\n")
            f.writelines(f"{key} = {value}\n" for key, value in keys.items())
    return path


class DatabaseMixin:
    """A fresh database, a config naming it, and the admin command run in-process."""

    def setUp(self):
        self.patch(auth, "HASHER", CHEAP)
        self.server = shared_server()
        self.url = self.server.new_database()
        self.name = self.url.rsplit("/", 1)[1]
        self.root = os.path.abspath(self.mktemp())
        os.mkdir(self.root)
        self.users_file = os.path.join(self.root, "users")
        self.mailroot = os.path.join(self.root, "mail")
        self.config = write_config(
            os.path.join(self.root, "popserv.ini"),
            server={"users": self.users_file, "mailroot": self.mailroot, "hostname": "h.test"},
            cluster={"database": self.url},
        )
        self.database = open_database(self.url, reactor)
        self.addCleanup(self.database.stop)
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)

    def run_admin(self, *argv: str, stdin: str = "") -> int:
        self.patch(sys, "stdin", io.StringIO(stdin))
        return admin.main([*argv, "--config", self.config])

    def add(self, user: str, password: str = "secret", *extra: str) -> int:
        return self.run_admin("adduser", user, "--password-stdin", *extra, stdin=password + "\n")

    def rows(self) -> dict[str, auth.Entry]:
        return self.database.call(pgusers.fetch_users)

    def check(self, user: str, password: bytes) -> bool:
        db = pgusers.DatabaseUsers(self.database, reactor, run_at_once)
        db.load()
        return self.successResultOf(db.check(user, password))

    def listen(self):
        """A connection listening on popserv_users, as a node's is."""
        import psycopg

        connection = psycopg.connect(self.url, autocommit=True)
        self.addCleanup(connection.close)
        connection.execute(f"LISTEN {pgusers.CHANNEL}")
        return connection


class DatabaseAdminTests(DatabaseMixin, unittest.TestCase):
    """adduser, passwd, deluser, list and quota write to and read from popserv_users."""

    def test_adduser_writes_a_row(self):
        """adduser stores an Argon2id string in the table, makes the Maildir, notifies the
        nodes, and leaves the users file alone."""
        listening = self.listen()
        self.assertEqual(self.add("alice", "s3cret"), 0, self.stderr.getvalue())
        [entry] = self.rows().values()
        self.assertEqual(entry.user, "alice")
        self.assertTrue(entry.password.startswith("{ARGON2ID}$argon2id$v=19$"), entry)
        self.assertTrue(self.check("alice", b"s3cret"))
        self.assertFalse(os.path.exists(self.users_file))
        for sub in ("cur", "new", "tmp"):
            self.assertTrue(os.path.isdir(os.path.join(self.mailroot, "alice", sub)))
        notes = {n.payload for n in listening.notifies(timeout=2, stop_after=1)}
        self.assertEqual(notes, {"alice"})
        self.assertIn("added user alice", self.stdout.getvalue())

    def test_adduser_refuses_existing_and_colliding(self):
        """A name in the table, or one whose Maildir would meet another's, is refused."""
        self.add("alice")
        self.assertEqual(self.add("alice"), 1)
        self.assertIn("already exists in popserv_users", self.stderr.getvalue())
        self.assertEqual(self.add("Alice"), 1)
        self.assertIn("collides with user 'alice'", self.stderr.getvalue())
        self.assertEqual(list(self.rows()), ["alice"])

    def test_passwd_keeps_other_fields(self):
        """passwd replaces the password and keeps the fields after it."""
        self.add("bob", "old", "--quota", "10M")
        before = self.rows()["bob"]
        status = self.run_admin(
            "passwd", "bob", "--password-stdin", "--scheme", "PLAIN", stdin="new\n"
        )
        self.assertEqual(status, 0, self.stderr.getvalue())
        after = self.rows()["bob"]
        self.assertEqual(after.password, "{PLAIN}new")
        self.assertEqual(after.rest, before.rest)
        self.assertEqual(after.fields, {"quota_rule": "*:storage=10M"})

    def test_passwd_of_unknown_user(self):
        status = self.run_admin("passwd", "nobody", "--password-stdin", stdin="pw\n")
        self.assertEqual(status, 1)
        self.assertIn("no such user: 'nobody' in popserv_users", self.stderr.getvalue())

    def test_deluser(self):
        """deluser removes the row; the Maildir stays unless --remove-mail."""
        self.add("carol")
        self.add("dave")
        self.assertEqual(self.run_admin("deluser", "carol"), 0)
        self.assertEqual(list(self.rows()), ["dave"])
        self.assertTrue(os.path.isdir(os.path.join(self.mailroot, "carol")))
        self.assertEqual(self.run_admin("deluser", "dave", "--remove-mail"), 0)
        self.assertEqual(self.rows(), {})
        self.assertFalse(os.path.exists(os.path.join(self.mailroot, "dave")))

    def test_list_and_quota(self):
        """list prints the table's users; quota sets a user's rule in the row."""
        self.add("erin")
        self.add("frank")
        self.assertEqual(self.run_admin("quota", "erin", "--quota", "100M"), 0)
        self.assertEqual(self.rows()["erin"].fields, {"quota_rule": "*:storage=100M"})
        self.stdout.truncate(0)
        self.stdout.seek(0)
        self.assertEqual(self.run_admin("list"), 0, self.stderr.getvalue())
        lines = [line.split("\t") for line in self.stdout.getvalue().splitlines()]
        self.assertEqual([line[0] for line in lines], ["erin", "frank"])
        self.assertEqual(lines[0][3], str(100 * 1024 * 1024))
        self.assertEqual(lines[1][3], "-")

    def test_users_option_still_means_the_file(self):
        """An explicit --users edits that file, as without a database."""
        status = self.run_admin(
            "adduser", "gina", "--password-stdin", "--users", self.users_file, stdin="pw\n"
        )
        self.assertEqual(status, 0, self.stderr.getvalue())
        self.assertEqual(self.rows(), {})
        with open(self.users_file, encoding="utf-8") as f:
            self.assertTrue(f.read().startswith("gina:{ARGON2ID}"))

    def test_database_down(self):
        """An unreachable database is one line naming [cluster] database, and status 1."""
        config = write_config(
            os.path.join(self.root, "down.ini"),
            server={"users": self.users_file, "mailroot": self.mailroot, "hostname": "h.test"},
            cluster={"database": f"postgresql://nobody@127.0.0.1:{free_port()}/none"},
        )
        self.patch(sys, "stdin", io.StringIO("pw\n"))
        status = admin.main(["adduser", "hank", "--password-stdin", "--config", config])
        self.assertEqual(status, 1)
        self.assertTrue(self.stderr.getvalue().startswith("popserv: [cluster] database: "))
        self.assertIn("Connection refused", self.stderr.getvalue())
        self.assertEqual(len(self.stderr.getvalue().splitlines()), 1)


class ImportUsersTests(DatabaseMixin, unittest.TestCase):
    """import-users loads a Dovecot passwd-file into popserv_users."""

    def passwd_file(self, text: str) -> str:
        path = os.path.join(self.root, "dovecot.passwd")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_import_several_schemes(self):
        """Entries of every scheme are stored verbatim, with their other fields, and verify."""
        self.patch(auth, "BCRYPT_ROUNDS", 4)
        self.patch(auth, "SHA_CRYPT_ROUNDS", 1000)
        schemes = ["ARGON2ID", "SHA512-CRYPT", "BLF-CRYPT", "CRAM-MD5", "SCRAM-SHA-256", "PLAIN"]
        lines = [
            f"u{n}:{auth.hash_password(f'pw{n}', scheme)}:1000:1000::/home/u{n}::\n"
            for n, scheme in enumerate(schemes)
        ]
        lines.append("quota:{PLAIN}q::::::userdb_quota_rule=*:storage=1G\n")
        path = self.passwd_file("# Dovecot users\n\n" + "".join(lines))
        self.assertEqual(self.run_admin("import-users", path), 0, self.stderr.getvalue())
        self.assertIn(
            f": {len(schemes) + 1} added, 0 updated, 0 unchanged, 0 skipped", self.stdout.getvalue()
        )
        rows = self.rows()
        for n, line in enumerate(lines[:-1]):
            self.assertEqual(rows[f"u{n}"].format(), line.rstrip("\n"))
            self.assertTrue(self.check(f"u{n}", f"pw{n}".encode()), schemes[n])
        self.assertEqual(rows["quota"].fields, {"quota_rule": "*:storage=1G"})

    def test_import_again_updates(self):
        """A second import counts the same entries unchanged and a changed one updated."""
        path = self.passwd_file("a:{PLAIN}1\nb:{PLAIN}2\n")
        self.run_admin("import-users", path)
        self.passwd_file("a:{PLAIN}1\nb:{PLAIN}3\nc:{PLAIN}4\n")
        self.stdout.truncate(0)
        self.stdout.seek(0)
        self.assertEqual(self.run_admin("import-users", path), 0)
        self.assertIn(": 1 added, 1 updated, 1 unchanged, 0 skipped", self.stdout.getvalue())
        self.assertEqual(self.rows()["b"].password, "{PLAIN}3")
        self.stdout.truncate(0)
        self.stdout.seek(0)
        self.assertEqual(self.run_admin("import-users", path), 0)
        self.assertIn(": 0 added, 0 updated, 3 unchanged, 0 skipped", self.stdout.getvalue())

    def test_skipped_lines_are_reported(self):
        """Bad lines, second entries, refused and colliding names are skipped, each named."""
        self.add("alice")
        path = self.passwd_file(
            "good:{PLAIN}g\n"
            "no password here\n"
            "good:{PLAIN}again\n"
            "Alice:{PLAIN}a\n"
            "bob@Example.ORG:{PLAIN}b\n"
            "ok@example.org:{PLAIN}o\n"
            "OK@example.org:{PLAIN}o2\n"
            "old:{MD5-CRYPT}$1$salt$hash\n"
        )
        self.assertEqual(self.run_admin("import-users", path), 0, self.stderr.getvalue())
        out = self.stdout.getvalue()
        self.assertIn(f"{path}:2: skipped: not a 'user:password' line", out)
        self.assertIn(f"{path}:3: skipped: a second entry for 'good' (line 1)", out)
        self.assertIn(f"{path}:4: skipped: user 'Alice' collides with user 'alice'", out)
        self.assertIn(f"{path}:5: skipped: user 'bob@Example.ORG': write the domain", out)
        self.assertIn(
            f"{path}:7: skipped: user 'OK@example.org' collides with user 'ok@example.org'", out
        )
        self.assertIn(": 3 added, 0 updated, 0 unchanged, 5 skipped", out)
        self.assertIn("cannot verify MD5-CRYPT passwords; these users cannot log in", out)
        self.assertEqual(sorted(self.rows()), ["alice", "good", "ok@example.org", "old"])
        self.assertEqual(self.rows()["good"].password, "{PLAIN}g")

    def test_needs_a_database(self):
        """Without [cluster] database, import-users says what it needs."""
        config = write_config(
            os.path.join(self.root, "single.ini"),
            server={"users": self.users_file, "mailroot": self.mailroot, "hostname": "h.test"},
        )
        path = self.passwd_file("a:{PLAIN}1\n")
        self.assertEqual(admin.main(["import-users", path, "--config", config]), 1)
        self.assertIn(
            "import-users loads a passwd-file into [cluster] database", self.stderr.getvalue()
        )

    def test_missing_file(self):
        status = self.run_admin("import-users", os.path.join(self.root, "none"))
        self.assertEqual(status, 1)
        self.assertIn("No such file or directory", self.stderr.getvalue())
        self.assertEqual(self.rows(), {})
