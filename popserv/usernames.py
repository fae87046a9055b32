"""User names: the Maildir each name maps to, and which names cannot live side by side.

``alice`` lives in ``<mailroot>/alice``, ``alice@Example.ORG`` in
``<mailroot>/example.org/alice``: domains are case-insensitive, as in DNS.

No two users may reach the same files, so two names *collide* when one's Maildir is the
other's or lies inside it (the user ``example.org`` and the user ``new@example.org``,
whose Maildir would be the first one's ``new/``).  The comparison folds what may make two
spellings one directory or one recipient: letter case and Unicode compatibility forms in
every part (case-insensitive file systems such as APFS, NTFS or CIFS mounts merge
``Alice`` and ``alice``, and the SMTP receiver tries a local part as given, then in lower
case), and trailing dots (DNS ignores a domain's).  Local parts are thus compared
without case, though each name keeps its own spelling for login and on disk.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from typing import NamedTuple


def user_parts(user: str) -> tuple[str, ...]:
    """The path components of a user's Maildir below the mail root.

    ``alice`` -> ``("alice",)``, ``alice@Example.ORG`` -> ``("example.org", "alice")``.
    Raises ValueError for a name that could escape the root or hide as a dotfile.
    """
    if not isinstance(user, str):
        raise TypeError(f"user name must be str, not {type(user).__name__}")
    parts = user.split("@")
    if len(parts) > 2:
        raise ValueError(f"user name {user!r} has more than one '@'")
    for part in parts:
        if not part or part.startswith(".") or "/" in part:
            raise ValueError(f"bad user name {user!r}")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in part):
            raise ValueError(f"user name {user!r} contains control characters")
    if len(parts) == 2:
        local, domain = parts
        return (domain.lower(), local)
    return (user,)


def _fold(part: str) -> str:
    """One spelling for the forms of a path component that may name the same thing."""
    folded = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", part).casefold())
    return folded.rstrip(".")


def collision_key(user: str) -> tuple[str, ...]:
    """The folded components of ``user``'s Maildir: equal keys meet, a key's prefix holds it.

    Raises ValueError (TypeError) for a name that has no Maildir, as ``user_parts``.
    """
    return tuple(_fold(part) for part in user_parts(user))


class Collision(NamedTuple):
    """Two names whose Maildirs meet: the same one, or ``user``'s inside ``other``'s."""

    user: str
    other: str
    nested: bool  # True: user's Maildir lies inside other's; False: they are one


def find_collisions(users: Iterable[str]) -> list[Collision]:
    """Every pair of names whose Maildirs are equal or nested, in the order given.

    Names that have no Maildir (``user_parts`` refuses them) collide with nothing.
    Linear in the number of names: a key has at most two components.
    """
    by_key: dict[tuple[str, ...], list[str]] = {}
    for user in dict.fromkeys(users):
        try:
            key = collision_key(user)
        except (TypeError, ValueError):
            continue
        by_key.setdefault(key, []).append(user)
    found = []
    for key, names in by_key.items():
        for i, user in enumerate(names):
            found.extend(Collision(user, other, False) for other in names[:i])
        for length in range(1, len(key)):
            for outer in by_key.get(key[:length], ()):
                found.extend(Collision(user, outer, True) for user in names)
    return found


def user_text(name: str | bytes | None) -> str | None:
    """A user name as a client sent it, as ``str``; None when it is not UTF-8 (or missing)."""
    if isinstance(name, bytes):
        try:
            return name.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return name
