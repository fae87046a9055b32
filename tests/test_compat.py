"""Twisted's own IMailbox, served through popserv's protocol via the adapter."""

import io

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.mail.pop3 import IMailbox
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from popserv.compat import MailboxMaildrop
from popserv.config import Config
from popserv.interfaces import CommitFailed, IMaildrop
from popserv.pop3 import POP3Factory


@implementer(IMailbox)
class ListMailbox:
    """A minimal IMailbox that deletes at once, as Twisted's own mailboxes do."""

    def __init__(self, messages):
        self.messages = list(messages)
        self.deleted_calls = []
        self.synced = False

    def listMessages(self, index=None):
        sizes = [len(m) for m in self.messages]
        return sizes if index is None else sizes[index]

    def getMessage(self, index):
        return io.BytesIO(self.messages[index])

    def getUidl(self, index):
        return b"uid-%d" % index

    def deleteMessage(self, index):
        self.deleted_calls.append(index)

    def undeleteMessages(self):
        pass

    def sync(self):
        self.synced = True


@implementer(IMailbox)
class TextMaildirLike(ListMailbox):
    """Returns text-mode files, as twisted.mail.maildir.MaildirMailbox does."""

    def __init__(self, path):
        super().__init__([b""])
        self.path = path

    def getMessage(self, index):
        return open(self.path)


class MailboxRealm:
    def __init__(self, mailbox):
        self.mailbox = mailbox

    def requestAvatar(self, avatar_id, mind, *interfaces):
        return IMaildrop, MailboxMaildrop(self.mailbox), lambda: None


class MailboxMaildropTests(unittest.TestCase):
    def test_provides_imaildrop(self):
        """The adapter provides IMaildrop."""
        verifyObject(IMaildrop, MailboxMaildrop(ListMailbox([b"a"])))

    def test_uidls_become_text(self):
        """Byte UIDLs from IMailbox become text UIDLs."""
        drop = MailboxMaildrop(ListMailbox([b"a\r\n", b"bb\r\n"]))
        self.assertEqual(drop.messages(), (("uid-0", 3), ("uid-1", 4)))

    def test_dele_waits_for_quit(self):
        """The mailbox's deleteMessage runs only at QUIT, through a real POP3 session."""
        mailbox = ListMailbox([b"Subject: x\r\n\r\nhi\r\n", b"Subject: y\r\n\r\nyo\r\n"])
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"pw")
        factory = POP3Factory(
            Portal(MailboxRealm(mailbox), [checker]),
            Config(auth_allow_plaintext=True),
            clock=task.Clock(),
        )
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"USER alice\r\nPASS pw\r\nDELE 2\r\nRETR 1\r\n")
        self.assertEqual(mailbox.deleted_calls, [])
        self.assertIn(b"\r\nhi\r\n.\r\n", transport.value())
        proto.dataReceived(b"QUIT\r\n")
        self.assertEqual(mailbox.deleted_calls, [1])
        self.assertTrue(mailbox.synced)

    def test_text_mode_files_are_reopened_binary(self):
        """A text-mode file from the mailbox is read as bytes instead."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"caf\xc3\xa9\r\n")
        source = MailboxMaildrop(TextMaildirLike(path)).open(0)
        self.addCleanup(source.close)
        self.assertEqual(source.read(), b"caf\xc3\xa9\r\n")

    def test_failed_delete_is_reported(self):
        """A deleteMessage that raises makes commit fail with CommitFailed."""
        mailbox = ListMailbox([b"a"])
        mailbox.deleteMessage = lambda index: 1 / 0
        drop = MailboxMaildrop(mailbox)
        self.failureResultOf(drop.commit([0]), CommitFailed)
