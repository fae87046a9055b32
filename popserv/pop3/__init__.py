"""The POP3 protocol (RFC 1939, RFC 2449): a connection, its two phases, and the factory.

It talks to storage only through ``IMaildrop`` avatars handed out by a ``twisted.cred``
portal, and knows nothing of files or directories.  ``POP3Factory(portal, clock=reactor)``
is the entry point for other Twisted applications (README, "Using popserv as a library").

* ``server``: one connection: lines, dispatch, replies, languages, timers, STLS.
* ``authorization``: the AUTHORIZATION state (USER/PASS, APOP, AUTH, the SASL exchange).
* ``login``: one login attempt: its turn, the throttle, the portal, the reply.
* ``transaction``: the logged-in session, sole owner of the DELE marks, and QUIT's commit.
* ``wire``: a stored message in wire form, streamed.
* ``replies``: every reply text, and its translations.
"""

from popserv.pop3.authorization import AUTHORIZATION
from popserv.pop3.factory import POP3Factory, throttle_settings
from popserv.pop3.replies import LANGUAGES, SPANISH, Reply
from popserv.pop3.server import UPDATE, POP3Server
from popserv.pop3.transaction import TRANSACTION
from popserv.pop3.wire import CHUNK_SIZE, TopLimiter, WireEncoder

__all__ = [
    "AUTHORIZATION",
    "CHUNK_SIZE",
    "LANGUAGES",
    "SPANISH",
    "TRANSACTION",
    "UPDATE",
    "POP3Factory",
    "POP3Server",
    "Reply",
    "TopLimiter",
    "WireEncoder",
    "throttle_settings",
]
