"""What the POP3 server says: every reply text in one place, and its translations (RFC 6856).

Tests compare with the named constants; a reply in another language keeps the status and
the response code of the English one.
"""

#: Where every POP3 event is logged, whichever part of the session logs it: the
#: fail2ban filter and admins' searches match it, so it does not follow the code's layout.
LOG_NAMESPACE = "popserv.pop3"


class Reply:
    """Reply texts in one place, so tests compare with named constants."""

    GREETING = b"+OK POP3 server ready."
    UNKNOWN = b"-ERR Unknown command."
    WRONG_STATE = b"-ERR Command not valid in this state."
    LINE_TOO_LONG = b"-ERR Command line too long."
    BAD_ARGUMENTS = b"-ERR Invalid arguments."
    NO_MESSAGE_NUMBER = b"-ERR Missing message number."
    BAD_MESSAGE_NUMBER = b"-ERR Invalid message number."
    NO_SUCH_MESSAGE = b"-ERR No such message."
    DELETED = b"-ERR Message is deleted."
    BAD_LINE_COUNT = b"-ERR Invalid line count."
    USER_FIRST = b"-ERR Send USER first."
    BAD_USER = b"-ERR Invalid user name."
    AUTH_FAILED = b"-ERR [AUTH] Authentication failed."
    IN_USE = b"-ERR [IN-USE] Mailbox is locked by another session."
    LOGIN_DELAY = b"-ERR [LOGIN-DELAY] Minimum time between logins has not elapsed."
    TEMP_FAILURE = b"-ERR [SYS/TEMP] Temporary server failure, try again later."
    UNREADABLE = b"-ERR [SYS/PERM] Message cannot be read."
    COMMIT_FAILED = b"-ERR [SYS/TEMP] Some deleted messages could not be removed."
    LOCK_LOST = b"-ERR [SYS/TEMP] Mailbox lock lost; nothing was changed, log in again."
    TIMEOUT = b"-ERR Disconnected for inactivity."
    PLAINTEXT_REFUSED = b"-ERR [AUTH] Plaintext login is not allowed without TLS; use STLS first."
    ALREADY_TLS = b"-ERR TLS is already active."
    NO_TLS = b"-ERR TLS is not available."
    BEGIN_TLS = b"+OK Begin TLS negotiation."
    NO_MECHANISM = b"-ERR Unsupported authentication mechanism."
    BAD_BASE64 = b"-ERR Invalid base64 data."
    AUTH_CANCELLED = b"-ERR Authentication cancelled."
    BAD_SASL = b"-ERR Invalid authentication exchange."
    NO_APOP = b"-ERR APOP is not enabled."
    MECHANISMS = b"+OK Supported mechanisms follow."
    CAPA = b"+OK Capability list follows."
    BYE = b"+OK Bye."
    LOGGED_IN = b"+OK Logged in, %d messages (%d octets)."
    LOGGING_OUT = b"+OK Logging out, %d messages deleted."
    LISTING = b"+OK %d messages (%d octets)"
    RETR = b"+OK %d octets"
    MESSAGE_DELETED = b"+OK Message %d deleted."
    RESET = b"+OK %d messages (%d octets)."
    TOO_MANY_CONNECTIONS = b"-ERR [SYS/TEMP] Too many connections; try again later."
    TOO_MANY_FAILURES = b"-ERR [SYS/TEMP] Too many failed logins; try again later."
    TOO_MANY_LOGINS = b"-ERR [SYS/TEMP] Too many logins at once; try again later."
    TOO_MANY_BAD_COMMANDS = b"-ERR Too many bad commands; closing the connection."
    UTF8 = b"+OK UTF-8 mode on."
    LANGUAGES = b"+OK Language listing follows."
    LANGUAGE_SET = b"+OK %s Language changed."
    NO_LANGUAGE = b"-ERR Language not available."


#: RFC 6856 LANG: response texts in Spanish, keyed by the English template.
SPANISH = {
    english: spanish.encode("utf-8")
    for english, spanish in {
        Reply.GREETING: "+OK Servidor POP3 listo.",
        Reply.UNKNOWN: "-ERR Orden desconocida.",
        Reply.WRONG_STATE: "-ERR Orden no válida en este estado.",
        Reply.LINE_TOO_LONG: "-ERR Línea de orden demasiado larga.",
        Reply.BAD_ARGUMENTS: "-ERR Argumentos no válidos.",
        Reply.NO_MESSAGE_NUMBER: "-ERR Falta el número de mensaje.",
        Reply.BAD_MESSAGE_NUMBER: "-ERR Número de mensaje no válido.",
        Reply.NO_SUCH_MESSAGE: "-ERR No existe ese mensaje.",
        Reply.DELETED: "-ERR El mensaje está borrado.",
        Reply.BAD_LINE_COUNT: "-ERR Número de líneas no válido.",
        Reply.USER_FIRST: "-ERR Envíe USER primero.",
        Reply.BAD_USER: "-ERR Nombre de usuario no válido.",
        Reply.AUTH_FAILED: "-ERR [AUTH] Autenticación fallida.",
        Reply.IN_USE: "-ERR [IN-USE] El buzón está bloqueado por otra sesión.",
        Reply.LOGIN_DELAY: "-ERR [LOGIN-DELAY] Aún no ha pasado el tiempo mínimo entre accesos.",
        Reply.TEMP_FAILURE: "-ERR [SYS/TEMP] Fallo temporal del servidor; inténtelo más tarde.",
        Reply.UNREADABLE: "-ERR [SYS/PERM] No se puede leer el mensaje.",
        Reply.COMMIT_FAILED: "-ERR [SYS/TEMP] No se pudieron eliminar algunos mensajes borrados.",
        Reply.LOCK_LOST: (
            "-ERR [SYS/TEMP] Se perdió el bloqueo del buzón; no se cambió nada, vuelva a entrar."
        ),
        Reply.TIMEOUT: "-ERR Desconectado por inactividad.",
        Reply.PLAINTEXT_REFUSED: (
            "-ERR [AUTH] No se admiten contraseñas en claro sin TLS; use STLS primero."
        ),
        Reply.ALREADY_TLS: "-ERR TLS ya está activo.",
        Reply.NO_TLS: "-ERR TLS no está disponible.",
        Reply.BEGIN_TLS: "+OK Comience la negociación TLS.",
        Reply.NO_MECHANISM: "-ERR Mecanismo de autenticación no admitido.",
        Reply.BAD_BASE64: "-ERR Datos base64 no válidos.",
        Reply.AUTH_CANCELLED: "-ERR Autenticación cancelada.",
        Reply.BAD_SASL: "-ERR Intercambio de autenticación no válido.",
        Reply.NO_APOP: "-ERR APOP no está activado.",
        Reply.MECHANISMS: "+OK Mecanismos admitidos:",
        Reply.CAPA: "+OK Lista de capacidades:",
        Reply.BYE: "+OK Adiós.",
        Reply.LOGGED_IN: "+OK Sesión iniciada, %d mensajes (%d octetos).",
        Reply.LOGGING_OUT: "+OK Cerrando la sesión, %d mensajes borrados.",
        Reply.LISTING: "+OK %d mensajes (%d octetos)",
        Reply.RETR: "+OK %d octetos",
        Reply.MESSAGE_DELETED: "+OK Mensaje %d borrado.",
        Reply.RESET: "+OK %d mensajes (%d octetos).",
        Reply.TOO_MANY_CONNECTIONS: "-ERR [SYS/TEMP] Demasiadas conexiones; inténtelo más tarde.",
        Reply.TOO_MANY_FAILURES: (
            "-ERR [SYS/TEMP] Demasiados accesos fallidos; inténtelo más tarde."
        ),
        Reply.TOO_MANY_LOGINS: "-ERR [SYS/TEMP] Demasiados accesos a la vez; inténtelo más tarde.",
        Reply.TOO_MANY_BAD_COMMANDS: "-ERR Demasiadas órdenes erróneas; se cierra la conexión.",
        Reply.UTF8: "+OK Modo UTF-8 activado.",
        Reply.LANGUAGES: "+OK Lista de idiomas:",
        Reply.LANGUAGE_SET: "+OK %s Idioma cambiado.",
        Reply.NO_LANGUAGE: "-ERR Idioma no disponible.",
    }.items()
}

#: Response languages (RFC 6856 LANG): tag -> (description, translations).
LANGUAGES = {
    b"en": (b"English", {}),
    b"es": ("Español".encode(), SPANISH),
}


class CommandError(Exception):
    """A command cannot run; ``reply`` is the -ERR line to send."""

    def __init__(self, reply: bytes):
        super().__init__(reply)
        self.reply = reply


def no_arguments(rest: bytes) -> None:
    """A command that takes none was given some."""
    if rest.strip():
        raise CommandError(Reply.BAD_ARGUMENTS)
