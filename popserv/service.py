"""Assemble popserv's services from a Config: storage, users, portal, factories, listeners."""

from __future__ import annotations

import os

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.cred.portal import Portal
from twisted.logger import Logger

from popserv.config import Config

log = Logger()


def make_service(config: Config, reactor=None) -> MultiService:
    """A MultiService with one named POP3 listener per ``config.pop3_listen`` entry.

    Listeners bind when the service starts (``privilegedStartService``), so ports below
    1024 work with ``twistd --uid``.  A missing mailroot or users file is created empty,
    so a first ``twistd -n popserv`` runs without any setup.
    """
    from popserv.auth import PasswdFile, UserDBChecker
    from popserv.maildir import MaildirStore
    from popserv.pop3 import POP3Factory
    from popserv.realm import MaildropRealm

    mailroot = os.path.abspath(config.mailroot)
    users = os.path.abspath(config.users)
    _make_private_dir(mailroot)
    _make_private_file(users)

    userdb = PasswdFile(users, reactor=reactor)
    realm = MaildropRealm(MaildirStore(mailroot, reactor=reactor))
    portal = Portal(realm, [UserDBChecker(userdb)])
    factory = POP3Factory(portal, config, clock=reactor)

    top = MultiService()
    for index, description in enumerate(config.pop3_listen):
        listener = strports.service(description, factory, reactor=reactor)
        listener.setName(f"pop3-{index}")
        listener.setServiceParent(top)
    log.info(
        "popserv {hostname}: POP3 on {listeners}, Maildirs under {mailroot}, users in {users}",
        hostname=config.hostname,
        listeners=", ".join(config.pop3_listen),
        mailroot=mailroot,
        users=users,
    )
    return top


def _make_private_dir(path: str) -> None:
    """Create ``path`` and any missing parents, readable by the owner only."""
    if os.path.isdir(path):
        return
    _make_private_dir(os.path.dirname(path))
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass


def _make_private_file(path: str) -> None:
    """Create an empty ``path`` (mode 0600), with its directory, unless it exists."""
    _make_private_dir(os.path.dirname(path))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)
