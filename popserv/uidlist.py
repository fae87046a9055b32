"""Read the UIDLs Dovecot and Courier served from a Maildir, so a switch to popserv keeps them.

Dovecot keeps ``dovecot-uidlist`` and Courier ``courierpop3dsizelist`` next to
``cur/``, ``new/`` and ``tmp/``.  This module only parses those files (never writes
them) and rebuilds each listed message's UIDL the way that server made it; it knows
nothing of sockets and does no locking.  Messages are matched by their base name,
the file name up to the ``:`` of the flags, as both servers match them.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field

DOVECOT_UIDLIST = "dovecot-uidlist"
COURIER_SIZELIST = "courierpop3dsizelist"

#: Dovecot's default ``pop3_uidl_format``.
DEFAULT_DOVECOT_FORMAT = "%08Xu%08Xv"

_VARIABLES = "uvfg"
_MODIFIERS = "LUXRM"
_SPEC_RE = re.compile(r"%(?:(?P<offset>\d+)\.)?(?P<width>\d+)?(?P<mods>[A-Za-z]*?)(?P<var>[a-z%])")


def base_name(name: str) -> str:
    """A Maildir file name without its ``:2,<flags>`` part: what the servers match on."""
    return name.split(":", 1)[0]


# Dovecot's pop3_uidl_format


@dataclass(frozen=True)
class _Piece:
    literal: str = ""
    var: str = ""
    mods: str = ""
    offset: int | None = None
    width: int | None = None
    zero_pad: bool = False


class UidlFormat:
    """A Dovecot ``pop3_uidl_format`` (Dovecot 2.3 syntax), expanded as Dovecot expands it.

    Variables: ``%u`` UID and ``%v`` UIDVALIDITY (decimal), ``%f`` and ``%g`` the base
    name (Dovecot's file name and, without a stored GUID, its GUID), ``%%`` a percent
    sign.  Before the variable: ``0<n>`` pads with zeros to ``n`` characters, ``<n>``
    keeps the first ``n``, ``<o>.<n>`` the ``n`` from offset ``o``; modifiers, applied
    left to right: ``X`` lower-case hex of a number, ``U``/``L`` upper/lower case,
    ``R`` reversed, ``M`` the MD5 in hex.  ``%m`` is refused: Dovecot itself cannot
    serve it from a Maildir, so no Maildir holds such UIDLs.

    Raises ValueError, naming the problem, for anything else.
    """

    def __init__(self, text: str):
        self.text = text
        self._pieces = self._parse(text)
        self.shape = self._shape()

    def __repr__(self) -> str:
        return f"UidlFormat({self.text!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, UidlFormat) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    @staticmethod
    def _parse(text: str) -> tuple[_Piece, ...]:
        pieces: list[_Piece] = []
        position = 0
        while position < len(text):
            percent = text.find("%", position)
            if percent < 0:
                pieces.append(_Piece(literal=text[position:]))
                break
            if percent > position:
                pieces.append(_Piece(literal=text[position:percent]))
            match = _SPEC_RE.match(text, percent)
            if match is None:
                raise ValueError(f"incomplete variable at {text[percent:]!r}")
            var, mods = match["var"], match["mods"]
            if var == "%":
                if match["offset"] or match["width"] or mods:
                    raise ValueError(f"bad {match[0]!r}: '%%' takes nothing in between")
                pieces.append(_Piece(literal="%"))
            elif var == "m":
                raise ValueError(
                    "%m (header MD5) is not available for Maildir, even in Dovecot; "
                    "use the format your Dovecot had, such as %08Xu%08Xv"
                )
            elif var not in _VARIABLES:
                raise ValueError(f"unknown variable %{var}; known: %u %v %f %g %%")
            else:
                unknown = [m for m in mods if m not in _MODIFIERS]
                if unknown:
                    raise ValueError(
                        f"unknown modifier {unknown[0]!r} in {match[0]!r}; "
                        f"known: {' '.join(_MODIFIERS)}"
                    )
                width = match["width"]
                pieces.append(
                    _Piece(
                        var=var,
                        mods=mods,
                        offset=int(match["offset"]) if match["offset"] else None,
                        width=int(width) if width else None,
                        zero_pad=bool(width) and width.startswith("0") and not match["offset"],
                    )
                )
            position = match.end()
        if not any(piece.var for piece in pieces):
            raise ValueError("contains no variable (%u, %v, %f or %g)")
        return tuple(pieces)

    def _shape(self) -> re.Pattern | None:
        """What every expansion matches, or None when a file name makes it anything.

        UIDs and UIDVALIDITYs are 32-bit: at most 10 decimal or 8 hex digits; an MD5 is
        32 hex digits; zero padding and cutting change those lengths.
        """
        parts = []
        for piece in self._pieces:
            if not piece.var:
                parts.append(re.escape(piece.literal))
                continue
            longest = None if piece.var in "fg" else 10
            for modifier in piece.mods:
                if modifier == "M":
                    longest = 32
                elif modifier == "X" and longest is not None:
                    longest = min(longest, 8) if longest == 10 else 32
            if longest is None:
                return None
            if piece.offset is not None or (piece.width is not None and not piece.zero_pad):
                longest = min(longest, piece.width or longest)
            elif piece.zero_pad:
                longest = max(longest, piece.width)
            parts.append(f"[0-9A-Fa-f]{{0,{longest}}}")
        return re.compile("".join(parts))

    @property
    def uses_name(self) -> bool:
        """Whether the expansion depends on the file name (``%f``, ``%g``)."""
        return any(piece.var in "fg" for piece in self._pieces)

    def expand(self, uid: int, uidvalidity: int, name: str) -> str:
        """The UIDL Dovecot made for a message: its UID, the mailbox's UIDVALIDITY, base name."""
        values = {"u": str(uid), "v": str(uidvalidity), "f": name, "g": name}
        out = []
        for piece in self._pieces:
            if not piece.var:
                out.append(piece.literal)
                continue
            value = values[piece.var]
            for modifier in piece.mods:
                value = _modify(modifier, value)
            if piece.offset is not None:
                value = value[piece.offset : piece.offset + (piece.width or len(value))]
            elif piece.zero_pad:
                value = value.rjust(piece.width, "0")
            elif piece.width is not None:
                value = value[: piece.width]
            out.append(value)
        return "".join(out)


def _modify(modifier: str, value: str) -> str:
    if modifier == "X":
        return format(int(value), "x") if value.isdigit() else "0"
    if modifier == "U":
        return value.upper()
    if modifier == "L":
        return value.lower()
    if modifier == "R":
        return value[::-1]
    return hashlib.md5(value.encode("utf-8", "surrogateescape")).hexdigest()  # "M"


# dovecot-uidlist


@dataclass(frozen=True)
class DovecotRecord:
    """One message of ``dovecot-uidlist``: its UID and the ``P`` (saved POP3 UIDL), if any."""

    uid: int
    pop3_uidl: str | None = None


@dataclass
class DovecotUidlist:
    """A parsed ``dovecot-uidlist``: UIDVALIDITY and base name -> record."""

    uidvalidity: int
    records: dict[str, DovecotRecord] = field(default_factory=dict)


def parse_dovecot_uidlist(text: str) -> DovecotUidlist:
    """Parse the text of ``dovecot-uidlist`` (versions 3 and 1); ValueError if it is neither.

    Version 3: ``3 V<uidvalidity> N<next uid> G<guid>`` then ``<uid> [<key><value> ...]
    :<file name>``.  Version 1 (Dovecot 1.0, Courier's ``courierimapuiddb``):
    ``1 <uidvalidity> <next uid>`` then ``<uid> <file name>``.  Lines that do not parse
    are skipped: those messages then get popserv's own UIDLs.
    """
    lines = text.split("\n")
    header = lines[0].split()
    if not header:
        raise ValueError("empty dovecot-uidlist")
    if header[0] == "3":
        fields = {f[:1]: f[1:] for f in header[1:] if f}
        if not fields.get("V", "").isdigit():
            raise ValueError("dovecot-uidlist header has no UIDVALIDITY")
        uidlist = DovecotUidlist(int(fields["V"]))
        for line in lines[1:]:
            before, colon, name = line.partition(" :")
            fields = before.split()
            if not colon or not fields or not fields[0].isdigit() or not name:
                continue
            saved = next((f[1:] for f in fields[1:] if f.startswith("P") and len(f) > 1), None)
            uidlist.records[base_name(name)] = DovecotRecord(int(fields[0]), saved)
        return uidlist
    if header[0] == "1" and len(header) >= 2 and header[1].isdigit():
        uidlist = DovecotUidlist(int(header[1]))
        for line in lines[1:]:
            uid, _, name = line.partition(" ")
            if uid.isdigit() and name:
                uidlist.records[base_name(name)] = DovecotRecord(int(uid))
        return uidlist
    raise ValueError(f"unsupported dovecot-uidlist version {header[0]!r}")


# courierpop3dsizelist

#: What Courier's numbered UIDLs (``UID<n>-<uidvalidity>``, ``UID<n>``) look like.
COURIER_SHAPE = re.compile(r"UID[0-9]+(?:-[0-9]+)?")


def _courier_name_uidl(base: str) -> str:
    """Courier's oldest UIDL: the base name with odd characters written ``+XX``."""
    out = []
    for byte in os.fsencode(base):
        if byte < 0x21 or byte > 0x7E or byte in b"'\"+":
            out.append(f"+{byte:02X}")
        else:
            out.append(chr(byte))
    return "".join(out)


def parse_courier_sizelist(text: str) -> dict[str, str]:
    """Parse ``courierpop3dsizelist`` into base name -> the UIDL Courier's pop3d served.

    Header ``/<version> <next uid> <uidvalidity>`` (versions 2 and 3), then
    ``<file name> <size> <uid>:<uidvalidity>[:<utf8>]`` per message.  The UIDL is
    ``UID<uid>-<uidvalidity>``, ``UID<uid>`` when the UIDVALIDITY is 0, and the escaped
    base name when the UID is 0.  ValueError for any other header.
    """
    lines = text.split("\n")
    header = lines[0]
    version = header[1:].split()[:1]
    if not header.startswith("/") or version not in (["2"], ["3"]):
        raise ValueError(f"unsupported courierpop3dsizelist header {header[:40]!r}")
    uidls = {}
    for line in lines[1:]:
        parts = line.rsplit(" ", 2)
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit():
            continue
        numbers = parts[2].split(":")
        if len(numbers) < 2 or not numbers[0].isdigit() or not numbers[1].isdigit():
            continue
        uid, uidvalidity = int(numbers[0]), int(numbers[1])
        base = base_name(parts[0])
        if uid == 0:
            uidls[base] = _courier_name_uidl(base)
        elif uidvalidity:
            uidls[base] = f"UID{uid}-{uidvalidity}"
        else:
            uidls[base] = f"UID{uid}"
    return uidls


# Reading a Maildir's files


def read_xuidl(path: str, limit: int = 64 * 1024) -> str | None:
    """The value of a message's first ``X-UIDL`` header (unfolded, trimmed), if any.

    Reads at most ``limit`` octets of the header; ``pop3_reuse_xuidl`` served this value.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        head = f.read(limit)
    value = None
    for raw in head.split(b"\n"):
        line = raw.rstrip(b"\r")
        if not line:
            break
        if value is not None:
            if line[:1] in (b" ", b"\t"):
                value += line
                continue
            break
        if line[:7].lower() == b"x-uidl:":
            value = line[7:]
    if value is None:
        return None
    return value.strip().decode("ascii", "replace")


@dataclass(frozen=True)
class Inherited:
    """What a Maildir's ``dovecot-uidlist`` and ``courierpop3dsizelist`` say, if present."""

    dovecot: DovecotUidlist | None = None
    courier: dict[str, str] = field(default_factory=dict)


_NOTHING = Inherited()


class UidlInheritance:
    """How one store rebuilds inherited UIDLs: the Dovecot format, X-UIDL reuse, a cache.

    Parsed files are cached by path and ``(inode, size, mtime_ns)``, so a listing of an
    unchanged Maildir costs one ``stat`` per file; Dovecot replaces ``dovecot-uidlist``
    by ``rename`` or appends to it, and either changes that key.
    """

    _CACHE_SIZE = 4096

    def __init__(self, dovecot_format: str = DEFAULT_DOVECOT_FORMAT, reuse_xuidl: bool = False):
        self.format = UidlFormat(dovecot_format)
        self.reuse_xuidl = reuse_xuidl
        self._cache: dict[str, tuple[tuple[int, int, int], object]] = {}

    def read(self, maildir: str, warn) -> Inherited:
        """The inherited UIDL files of a Maildir; an unreadable or bad file counts as absent.

        ``warn(path, reason)`` is called for each file that is present but unusable.
        """
        dovecot = self._cached(os.path.join(maildir, DOVECOT_UIDLIST), parse_dovecot_uidlist, warn)
        courier = self._cached(
            os.path.join(maildir, COURIER_SIZELIST), parse_courier_sizelist, warn
        )
        if dovecot is None and courier is None:
            return _NOTHING
        return Inherited(dovecot, courier or {})

    def _cached(self, path: str, parse, warn):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            self._cache.pop(path, None)
            return None
        except OSError as e:
            warn(path, str(e))
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._cache.get(path)
            if cached is not None and cached[0] == key:
                return cached[1]
            try:
                parsed = parse(f.read().decode("utf-8", "surrogateescape"))
            except (OSError, ValueError) as e:
                warn(path, str(e))
                return None
        if len(self._cache) >= self._CACHE_SIZE:
            self._cache.clear()
        self._cache[path] = (key, parsed)
        return parsed

    def own_is_ambiguous(self, uidl: str) -> bool:
        """Whether one of popserv's own UIDLs could be mistaken for an inherited one.

        popserv's own UIDL is the unique part of the file name.  An inherited UIDL made
        from numbers only (the default ``%08Xu%08Xv``: 16 hex digits; ``%u``; ``%v.%u``)
        consists of hex digits and the format's literal text, and Courier's numbered ones
        of ``UID<n>-<n>``: a unique part with the usual ``<secs>.<id>.<host>`` shape has a
        host name, so it never matches those shapes; one that does (a bare number, say)
        is ambiguous, and the caller serves a form that cannot match instead.  UIDLs made
        from the file name (``%f``, ``%g``, Courier's oldest) come from the same names
        as popserv's own, and distinct files have distinct unique parts.  Saved ``P``
        values and X-UIDL headers can be anything; they are checked against the snapshot.
        """
        shape = self.format.shape
        if shape is not None and shape.fullmatch(uidl):
            return True
        return COURIER_SHAPE.fullmatch(uidl) is not None

    def unambiguous(self, uidl: str) -> str:
        """An own UIDL for a message whose unique part is ambiguous: ``~`` and a hash of it.

        ``~`` is neither a hex digit nor in ``UID<n>-<n>``, so it matches neither shape
        unless the format's own literal text starts with ``~``; more ``~`` then.
        """
        digest = hashlib.sha256(uidl.encode("utf-8", "surrogateescape")).hexdigest()[:40]
        candidate = "~" + digest
        while self.own_is_ambiguous(candidate) and len(candidate) < 70:
            candidate = "~" + candidate
        return candidate
