"""Where the server's log goes and in which form: twistd's text lines or JSON lines, in
a file rotated within bounds.

Two ways in.  ``twistd --logger popserv.logs.json_stdout popserv ...`` writes JSON lines
to standard output (for journald or a log shipper), whatever the configuration says.
The ``[log]`` section (``format``, ``file``, ``max_size``, ``keep``) is applied through
the application twistd builds: ``tap.makeService`` wraps the server in ``ApplicationLog``,
which hands twistd the observer as the application's ``ILogObserver`` (twistd prefers it
to its own ``--logfile`` and ``--syslog``; an explicit ``--logger`` still wins).

twistd's own ``--logfile`` starts a new file every megabyte and keeps every old one;
a file written here keeps ``keep`` old files of ``max_size`` octets at most.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO

from twisted.application.service import MultiService
from twisted.logger import FileLogObserver, ILogObserver, formatEvent, textFileLogObserver
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile

from popserv.config import Config, ConfigError

#: Keys every JSON line has; an event field of the same name gives way to them.
RESERVED = ("time", "level", "namespace", "message")


@dataclass(frozen=True)
class LogSettings:
    """The ``[log]`` section: the form of each line, and the file with its rotation."""

    format: str = "text"
    file: str = ""
    max_size: int = 10 * 1024 * 1024
    keep: int = 10

    @classmethod
    def from_config(cls, config: Config) -> LogSettings:
        return cls(config.log_format, config.log_file, config.log_max_size, config.log_keep)

    @property
    def ours(self) -> bool:
        """Whether popserv writes the log itself, instead of leaving it to twistd."""
        return self.format != "text" or bool(self.file)


def _plain(value: object) -> object:
    """``value`` as JSON can hold it: containers walked, anything else of no JSON type a str."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def event_as_json(event: Mapping) -> str:
    """One event as one line of JSON (no line end): time, level, namespace, message,
    then the event's fields, and the traceback of a failure.

    The event's own fields are its keys not starting with ``log_``.  The line is ASCII:
    line ends, quotes and every other character a client could use to break it are
    escaped, and no record separator is written.
    """
    record: dict[str, object] = {"time": None}
    when = event.get("log_time")
    if isinstance(when, (int, float)):
        stamp = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
        record["time"] = stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")
    record["level"] = getattr(event.get("log_level"), "name", "info")
    record["namespace"] = _plain(event.get("log_namespace", ""))
    try:
        record["message"] = formatEvent(event)
    except Exception:  # formatEvent reports its own errors; this is a last resort
        record["message"] = f"<unformattable event {event.get('log_format')!r}>"
    for key, value in event.items():
        if not key.startswith("log_") and key not in RESERVED:
            record[key] = _plain(value)
    if "log_system" in event and "system" not in record:
        record["system"] = _plain(event["log_system"])
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = _plain(failure)
    return json.dumps(record, ensure_ascii=True, allow_nan=False)


def json_file_observer(out: IO) -> FileLogObserver:
    """An observer writing each event to ``out`` as one JSON line."""
    return FileLogObserver(out, lambda event: event_as_json(event) + "\n")


def json_stdout() -> FileLogObserver:
    """JSON lines on standard output: ``twistd --logger popserv.logs.json_stdout``."""
    return json_file_observer(sys.stdout)


def open_log_file(path: str, max_size: int, keep: int) -> LogFile:
    """``path`` opened for appending; past ``max_size`` octets (0: never) it becomes
    ``path.1`` and older files move up, ``keep`` of them kept."""
    return LogFile.fromFullPath(
        os.path.abspath(path), rotateLength=max_size or None, maxRotatedFiles=keep
    )


def _destination(settings: LogSettings, twistd_options: Mapping) -> str:
    """The file to write, or "-" for standard output: [log] file, else where twistd would."""
    if settings.file:
        return settings.file
    logfile = twistd_options.get("logfile") or ""
    if logfile == "-" or (not logfile and twistd_options.get("nodaemon")):
        return "-"
    return logfile or "twistd.log"


def check_settings(settings: LogSettings, twistd_options: Mapping) -> None:
    """Refuse, before twistd starts, a log popserv could not write; a ConfigError says why."""
    if not settings.ours or twistd_options.get("logger"):
        return
    if twistd_options.get("syslog") and not settings.file:
        raise ConfigError(
            "[log] format = json cannot go to twistd --syslog: set [log] file, "
            "or drop --syslog (or use format = text)"
        )
    path = _destination(settings, twistd_options)
    if path == "-":
        if not twistd_options.get("nodaemon"):
            raise ConfigError("[log]: a daemon cannot log to standard output; set [log] file")
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(f"[log] file = {path}: the directory {directory} does not exist")


def observer_for(settings: LogSettings, twistd_options: Mapping) -> ILogObserver | None:
    """The observer ``settings`` ask for, its file opened; None to leave the log to twistd
    (also when twistd was given ``--logger``, which wins over [log])."""
    if not settings.ours or twistd_options.get("logger"):
        return None
    path = _destination(settings, twistd_options)
    if path == "-":
        out = sys.stdout
    else:
        out = open_log_file(path, settings.max_size, settings.keep)
    if settings.format == "json":
        return json_file_observer(out)
    return textFileLogObserver(out)


class ApplicationLog(MultiService):
    """The server, with the log observer twistd is to use while it runs.

    twistd adds the service it gets from ``makeService`` to the application it makes;
    at that moment the observer becomes the application's ``ILogObserver``.
    """

    def __init__(self, server, observer: ILogObserver):
        super().__init__()
        self.observer = observer
        server.setServiceParent(self)

    def setServiceParent(self, parent) -> None:
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)
