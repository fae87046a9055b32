"""Serve a Twisted ``twisted.mail.pop3.IMailbox`` as a popserv ``IMaildrop`` avatar.

Applications that already have Twisted mailboxes can mount popserv's protocol without
rewriting their storage.  The adapter keeps popserv's rules where ``IMailbox`` is looser:
DELE only marks, and the mailbox's own ``deleteMessage`` runs at QUIT.
"""

from __future__ import annotations

import io

from twisted.internet import defer
from twisted.mail.pop3 import IMailbox
from zope.interface import implementer

from popserv.interfaces import CommitFailed, IMaildrop


@implementer(IMaildrop)
class MailboxMaildrop:
    """An ``IMaildrop`` over an ``IMailbox``; the snapshot is taken when adapted.

    ``IMailbox`` has no flags and no retention: retrieved messages are left as they are.
    """

    expire_days = None

    def __init__(self, mailbox: IMailbox):
        self.mailbox = mailbox
        sizes = mailbox.listMessages()
        snapshot = []
        for index, size in enumerate(sizes):
            uidl = mailbox.getUidl(index)
            if isinstance(uidl, bytes):
                uidl = uidl.decode("ascii")
            snapshot.append((uidl, size))
        self._snapshot = tuple(snapshot)

    def messages(self):
        return self._snapshot

    def open(self, index: int):
        source = self.mailbox.getMessage(index)
        if isinstance(source, io.TextIOBase):
            # Twisted's MaildirMailbox opens messages in text mode; POP3 sends bytes.
            name = source.name
            source.close()
            source = open(name, "rb")
        return source

    def commit(self, deleted, retrieved=frozenset()):
        failed = 0
        for index in sorted(set(deleted)):
            try:
                self.mailbox.deleteMessage(index)
            except Exception:
                failed += 1
        d = defer.maybeDeferred(self.mailbox.sync)
        if failed:
            d.addCallback(lambda _: defer.fail(CommitFailed(failed)))
        return d

    def when_lost(self, callback) -> None:
        """IMailbox has no lock to lose."""

    def close(self) -> None:
        """IMailbox has no lock to release."""
