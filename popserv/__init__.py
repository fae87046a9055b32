"""popserv: a POP3 server (with an SMTP receiver) built on Twisted."""

__version__ = "0.1.0"
