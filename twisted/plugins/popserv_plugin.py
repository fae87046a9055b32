"""Make ``twistd popserv`` known to Twisted; names the options module lazily, as a string."""

from twisted.application.service import ServiceMaker

popserv = ServiceMaker(
    "popserv",
    "popserv.tap",
    "A POP3 server (RFC 1939) with an SMTP receiver, over Maildir",
    "popserv",
)
