"""In-memory fakes of popserv's storage interfaces and workers, for tests of the layers above.

``tests/test_maildir.py`` runs the same contract tests against these fakes and the real
Maildir store, and ``tests/test_workers.py`` runs ``run_at_once`` against
``Workers.run``, so the fakes behave like the real thing where callers can tell.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

from twisted.internet import defer
from zope.interface import implementer

from popserv.interfaces import (
    CommitFailed,
    IMaildrop,
    IMaildropStore,
    LockLost,
    MailboxPolicy,
    MaildropLocked,
)
from popserv.maildir import crlf_size, user_parts


def run_at_once(f, *args) -> defer.Deferred:
    """A fake ``Workers.run``: ``f(*args)`` in the calling thread, its result or failure fired."""
    return defer.maybeDeferred(f, *args)


@implementer(IMaildrop)
class FakeMaildrop:
    """An ``IMaildrop`` over a list of messages in memory.

    ``unreadable`` indexes make ``open`` raise OSError; ``undeletable`` indexes survive
    ``commit``, which then fails with ``CommitFailed``.  After the session, ``closed``,
    ``committed`` and ``removed`` (UIDLs removed by commits) say what the caller did.
    ``lose_lock()`` plays a lock kept in a database going away.
    """

    def __init__(
        self,
        messages: Sequence[bytes],
        unreadable: Iterable[int] = (),
        undeletable: Iterable[int] = (),
        *,
        user: str = "fake",
        uidls: Sequence[str] | None = None,
        store: FakeMaildropStore | None = None,
        policy: MailboxPolicy | None = None,
    ):
        self.user = user
        self.policy = policy or MailboxPolicy()
        self.expire_days = self.policy.expire_days
        self.path = f"fake:{user}"
        if uidls is None:
            uidls = [f"fake-{number}" for number in range(1, len(messages) + 1)]
        self._data = list(messages)
        self._snapshot = tuple(zip(uidls, map(crlf_size, self._data), strict=True))
        self._unreadable = frozenset(unreadable)
        self._undeletable = frozenset(undeletable)
        self._store = store
        self.closed = False
        self.committed = False
        self.removed: list[str] = []
        #: The indexes the last commit was told were retrieved in full.
        self.retrieved: frozenset[int] = frozenset()
        self.lock_lost = False
        self._when_lost: list = []

    def _check(self, index: int) -> None:
        if not 0 <= index < len(self._data):
            raise IndexError(f"no message at index {index}")

    def messages(self) -> tuple[tuple[str, int], ...]:
        """The snapshot: ``(uidl, size)`` with CRLF sizes, as the real store counts them."""
        return self._snapshot

    def open(self, index: int) -> io.BytesIO:
        """The message bytes; OSError for an index made unreadable."""
        self._check(index)
        if index in self._unreadable:
            raise PermissionError(f"fake message {index} is unreadable")
        return io.BytesIO(self._data[index])

    def commit(self, deleted: Iterable[int], retrieved: Iterable[int] = ()) -> defer.Deferred:
        """Remove those messages (from the store too), except undeletable ones.

        As the real store: with EXPIRE 0 the retrieved ones are removed too.
        """
        deleted = set(deleted)
        if self.lock_lost:
            return defer.fail(LockLost(self.user))
        self.retrieved = frozenset(retrieved)
        if self.policy.expire_days == 0:
            deleted |= self.retrieved
        for index in deleted | self.retrieved:
            self._check(index)
        self.committed = True
        failed = deleted & self._undeletable
        gone = [self._snapshot[i][0] for i in sorted(deleted - failed)]
        self.removed.extend(uidl for uidl in gone if uidl not in self.removed)
        if self._store is not None:
            self._store._remove(self.user, gone)
        if failed:
            return defer.fail(CommitFailed(len(failed)))
        return defer.succeed(None)

    def when_lost(self, callback) -> None:
        """``callback()`` when the test calls ``lose_lock``."""
        self._when_lost.append(callback)

    def lose_lock(self) -> None:
        """The lock is gone, as when its database connection breaks: tell the session."""
        self.lock_lost = True
        callbacks, self._when_lost = self._when_lost, []
        for callback in callbacks:
            callback()

    def close(self) -> None:
        """Release the store's lock, once."""
        if self.closed:
            return
        self.closed = True
        if self._store is not None:
            self._store._release(self.user)


@implementer(IMaildropStore)
class FakeMaildropStore:
    """An ``IMaildropStore`` over ``{user: [message bytes, ...]}``, with the real locking rules.

    The dict is shared, not copied: commits remove from it, and tests may read it.
    Add mail with ``deliver`` so it gets a fresh UIDL.
    """

    def __init__(self, mailboxes: dict[str, list[bytes]] | None = None):
        self.mailboxes = mailboxes if mailboxes is not None else {}
        self._uidls: dict[str, list[str]] = {}
        self._next_uidl = 1
        self._locked: set[str] = set()
        self.opened: list[FakeMaildrop] = []

    def _sync_uidls(self, user: str) -> list[str]:
        uidls = self._uidls.setdefault(user, [])
        while len(uidls) < len(self.mailboxes[user]):
            uidls.append(f"fake-{self._next_uidl}")
            self._next_uidl += 1
        return uidls

    def path_for(self, user: str) -> str:
        """A pseudo-path; bad names are rejected exactly as the real store rejects them."""
        return "fake:" + "/".join(user_parts(user))

    def create(self, user: str) -> str:
        """Give ``user`` an empty mailbox if they have none."""
        path = self.path_for(user)
        self.mailboxes.setdefault(user, [])
        return path

    def deliver(self, user: str, message: bytes) -> None:
        """Add a message, as the SMTP side would (outside any session's snapshot)."""
        self.create(user)
        self.mailboxes[user].append(message)
        self._sync_uidls(user)

    def open_maildrop(self, user: str, policy: MailboxPolicy | None = None) -> defer.Deferred:
        """Lock and snapshot ``user``'s mailbox; fails with MaildropLocked if held.

        ``policy`` is kept on the maildrop (``opened`` shows it); no message is expired.
        """
        try:
            self.create(user)
        except ValueError:
            return defer.fail()
        if user in self._locked:
            return defer.fail(MaildropLocked(user))
        self._locked.add(user)
        maildrop = FakeMaildrop(
            list(self.mailboxes[user]),
            user=user,
            uidls=list(self._sync_uidls(user)),
            store=self,
            policy=policy,
        )
        self.opened.append(maildrop)
        return defer.succeed(maildrop)

    def is_locked(self, user: str) -> bool:
        """Whether a session holds ``user``'s maildrop (for realm tests)."""
        return user in self._locked

    def _release(self, user: str) -> None:
        self._locked.discard(user)

    def _remove(self, user: str, uidls: Iterable[str]) -> None:
        doomed = set(uidls)
        current = self._sync_uidls(user)
        keep = [i for i, uidl in enumerate(current) if uidl not in doomed]
        self.mailboxes[user][:] = [self.mailboxes[user][i] for i in keep]
        current[:] = [current[i] for i in keep]
