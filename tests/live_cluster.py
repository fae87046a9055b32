"""Several ``twistd popserv`` nodes sharing one mail root and one real PostgreSQL, on loopback.

``LiveCluster`` makes a database of its own on the process's PostgreSQL
(``tests.live_pg.shared_server``), with popserv's schema and the test's users in
``popserv_users`` (written with SQL, as any admin tool might), a mail root in the
test's directory, and ``ClusterNode`` processes configured with ``[cluster] database``
and a node name each.  Nothing listens anywhere but 127.0.0.1.
"""

from __future__ import annotations

import os

from popserv.auth import hash_password
from popserv.pgdb import reach_database
from tests.live_pg import shared_server
from tests.live_twistd import TwistdServer


class ClusterNode(TwistdServer):
    """One node: its own config, log and ports; the cluster's mail root and database."""

    def __init__(self, testcase, cluster: LiveCluster, name: str, *, smtp=False, settings=None):
        sections = {
            "server": {"mailroot": cluster.mailroot},
            "cluster": {"database": cluster.url, "node": name},
        }
        for section, keys in (settings or {}).items():
            sections.setdefault(section, {}).update(keys)
        # The users are in the database; the node's users file holds them too, which a
        # node reading users from the database never looks at.
        super().__init__(testcase, cluster.users, smtp=smtp, settings=sections)
        self.name = name
        self.mailroot = cluster.mailroot


class LiveCluster:
    """A database, a mail root and ``count`` nodes (not started: call ``start``).

    ``users`` go into the database with ``scheme`` (PLAIN: fast enough for many logins);
    ``settings`` are every node's extra config keys, as for ``TwistdServer``.
    """

    def __init__(
        self,
        testcase,
        users: dict[str, str],
        count: int = 2,
        *,
        smtp: bool = False,
        settings=None,
        scheme: str = "PLAIN",
        node_class=ClusterNode,
    ):
        self.server = shared_server()
        self.url = self.server.new_database()
        self.database_name = self.url.rsplit("/", 1)[1]
        reach_database(self.url)
        self.users = dict(users)
        for user, password in users.items():
            self.add_user(user, password, scheme)
        self.mailroot = os.path.abspath(testcase.mktemp())
        os.makedirs(self.mailroot)
        self.nodes = [
            node_class(testcase, self, f"node{n}", smtp=smtp, settings=settings)
            for n in range(1, count + 1)
        ]

    def start(self) -> None:
        """Start every node and wait until each greets."""
        for node in self.nodes:
            node.start()

    def psql(self, sql: str) -> str:
        """What psql prints for ``sql`` in the cluster's database."""
        return self.server.psql(sql, self.database_name)

    def add_user(self, user: str, password: str, scheme: str = "PLAIN") -> None:
        """A row in ``popserv_users``, as ``popserv adduser`` would make it."""
        stored = hash_password(password, scheme).replace("'", "''")
        self.psql(
            f"INSERT INTO popserv_users (name, password) VALUES ('{user}', '{stored}') "
            f"ON CONFLICT (name) DO UPDATE SET password = excluded.password"
        )

    def maildir(self, user: str, sub: str = "") -> str:
        """The path of ``user``'s Maildir in the shared mail root."""
        return os.path.join(self.mailroot, user, sub)
