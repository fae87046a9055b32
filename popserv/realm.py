"""The twisted.cred realm: an authenticated user becomes their opened, locked maildrop."""

from twisted.cred.portal import IRealm
from zope.interface import implementer

from popserv.interfaces import IMaildrop, IMaildropStore


@implementer(IRealm)
class MaildropRealm:
    """Hands out ``IMaildrop`` avatars; the logout callable releases the lock."""

    def __init__(self, store: IMaildropStore, policies=None):
        """``policies``: a ``popserv.policy.MailboxPolicies`` giving each user's
        ``MailboxPolicy`` (the defaults for all without it)."""
        self.store = store
        self.policies = policies

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IMaildrop not in interfaces:
            raise NotImplementedError("popserv only serves IMaildrop avatars")
        if isinstance(avatarId, bytes):
            avatarId = avatarId.decode("utf-8")
        if self.policies is None:
            d = self.store.open_maildrop(avatarId)
        else:
            d = self.store.open_maildrop(avatarId, self.policies.for_user(avatarId))
        d.addCallback(lambda maildrop: (IMaildrop, maildrop, maildrop.close))
        return d
