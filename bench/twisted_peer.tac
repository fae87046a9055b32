"""Twisted's own POP3 and SMTP protocol classes over Maildirs: the "twisted" peer.

``twistd mail`` itself cannot serve this benchmark under Python 3 with Twisted 26.10:
its virtual domains are keyed by ``str`` but looked up with ``bytes`` (every POP3 login
and every SMTP recipient is refused), ``--user`` raises ``TypeError`` (DirDBM keys must
be bytes), and ``MaildirMailbox.getMessage`` opens messages in text mode, so RETR sends
nothing.  This application keeps what ``twistd mail`` runs -- ``twisted.mail.pop3.POP3``
over ``twisted.mail.maildir.MaildirMailbox``, ``twisted.mail.smtp.ESMTP``, a file-backed
``twisted.cred`` checker with plain passwords -- and changes only what is needed to make
it work: messages are opened in binary mode, and SMTP delivery writes ``tmp/``, fsyncs
(in a thread), renames into ``new/`` and fsyncs the directory before the 250 reply.

Run by bench/run.py as ``twistd -n -y bench/twisted_peer.tac`` with the environment
variables BENCH_MAILROOT, BENCH_USERS, BENCH_POP3 and, for SMTP, BENCH_SMTP and
BENCH_DOMAIN.
"""

import itertools
import os
import time

from twisted.application import service, strports
from twisted.cred.checkers import FilePasswordDB
from twisted.cred.portal import IRealm, Portal
from twisted.internet import protocol, threads
from twisted.mail import maildir, pop3, smtp
from zope.interface import implementer

MAILROOT = os.fsencode(os.path.abspath(os.environ["BENCH_MAILROOT"]))
USERS = os.environ["BENCH_USERS"]
POP3_LISTEN = os.environ.get("BENCH_POP3", "")
SMTP_LISTEN = os.environ.get("BENCH_SMTP", "")
DOMAIN = os.environ.get("BENCH_DOMAIN", "bench.test").encode("ascii")


class BinaryMaildirMailbox(maildir.MaildirMailbox):
    """Twisted's Maildir mailbox, with messages read as bytes (what RETR must send)."""

    def getMessage(self, i):
        return open(self.list[i], "rb")


@implementer(IRealm)
class MaildirRealm:
    def requestAvatar(self, avatarId, mind, *interfaces):
        if pop3.IMailbox not in interfaces:
            raise NotImplementedError()
        mailbox = BinaryMaildirMailbox(os.path.join(MAILROOT, avatarId))
        return pop3.IMailbox, mailbox, lambda: None


def _plain(username, given, stored):
    """The users file holds ``{PLAIN}password``, the same scheme popserv and Dovecot read."""
    return b"{PLAIN}" + given


checker = FilePasswordDB(USERS, delim=b":", hash=_plain, cache=True)
portal = Portal(MaildirRealm(), [checker])


class POP3Factory(protocol.ServerFactory):
    def buildProtocol(self, addr):
        p = pop3.POP3()
        p.portal = portal
        p.factory = self
        return p


_counter = itertools.count()


@implementer(smtp.IMessage)
class MaildirMessage:
    """One incoming message: lines into ``tmp/``; at the end fsync, rename, fsync ``new/``."""

    def __init__(self, maildir_path: bytes):
        self.maildir = maildir_path
        self.name = b"%d.M%dP%dQ%d.twistedpeer" % (
            time.time(), time.time_ns() // 1000 % 1_000_000, os.getpid(), next(_counter))
        self.tmp = os.path.join(maildir_path, b"tmp", self.name)
        self.file = open(self.tmp, "wb")

    def lineReceived(self, line):
        self.file.write(line + b"\n")

    def eomReceived(self):
        return threads.deferToThread(self._finish)

    def _finish(self):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        new = os.path.join(self.maildir, b"new")
        os.rename(self.tmp, os.path.join(new, self.name))
        fd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return self.name

    def connectionLost(self):
        self.file.close()
        os.unlink(self.tmp)


@implementer(smtp.IMessageDelivery)
class Delivery:
    def receivedHeader(self, helo, origin, recipients):
        return b"Received: from " + helo[0] + b" by " + DOMAIN + b" (twisted peer)"

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        local = user.dest.local
        local = local if isinstance(local, bytes) else local.encode()
        domain = user.dest.domain
        domain = domain if isinstance(domain, bytes) else domain.encode()
        path = os.path.join(MAILROOT, local)
        if domain.lower() != DOMAIN or b"/" in local or not os.path.isdir(path):
            raise smtp.SMTPBadRcpt(user)
        return lambda: MaildirMessage(path)


class SMTPFactory(smtp.SMTPFactory):
    protocol = smtp.ESMTP

    def buildProtocol(self, addr):
        p = smtp.SMTPFactory.buildProtocol(self, addr)
        p.delivery = Delivery()
        p.host = DOMAIN
        return p


application = service.Application("twisted-peer")
if POP3_LISTEN:
    strports.service(POP3_LISTEN, POP3Factory()).setServiceParent(application)
if SMTP_LISTEN:
    strports.service(SMTP_LISTEN, SMTPFactory()).setServiceParent(application)
