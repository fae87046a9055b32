"""TLS session-ticket keys shared by the workers: every context given a ``TicketKeyRing``
encrypts tickets with its current key and still opens those of the previous one.

OpenSSL makes random ticket keys for each ``SSL_CTX``, so with several workers a ticket
opens only on the worker that issued it.  pyOpenSSL has no call to set them, so this
module finds OpenSSL's own functions in the process, with ``ctypes``: in the symbol
table of the ``cryptography`` extension that carries a static OpenSSL (PyPI's wheels),
or in a system ``libssl.so.3``/``libcrypto.so.3`` that the extension links.  It trusts
what it found only once it has proved, at run time, that they are the very library
pyOpenSSL uses (the extension's own wrappers lie where the symbol table says, and a
timeout set through pyOpenSSL reads back through them).  Where that fails, one warning
says so and OpenSSL keeps its per-process keys.

A ticket is ``name(16) | IV | AES-256-CBC(session) | HMAC-SHA256``, OpenSSL's own format;
this module only chooses the key: the current one to encrypt, the current or previous
one (found by name) to decrypt, asking for a fresh ticket when it was the previous.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
import threading
import weakref
from dataclasses import dataclass

from OpenSSL import SSL
from twisted.logger import Logger

log = Logger()

#: A key: its name (sent in the clear in each ticket), HMAC-SHA256 key, AES-256 key.
NAME_SIZE, HMAC_SIZE, AES_SIZE = 16, 32, 32
KEY_SIZE = NAME_SIZE + HMAC_SIZE + AES_SIZE
#: Seconds between two rotations: a key encrypts this long, then decrypts as long again,
#: well past a ticket's lifetime (the context's timeout, OpenSSL's 7200 s by default).
ROTATION_INTERVAL = 12 * 3600.0
#: The session ID context of every context that shares the keys: OpenSSL resumes a
#: session only in a context of the same one, and Twisted draws a random one per context.
SESSION_ID_CONTEXT = b"popserv"

# The callback's return values (SSL_CTX_set_tlsext_ticket_key_evp_cb(3)).
_ERROR, _NOT_FOUND, _OK, _OK_RENEW = -1, 0, 1, 2
# OSSL_PARAM data types and "not yet modified" (openssl/core.h, openssl/params.h).
_OSSL_PARAM_UTF8_STRING, _OSSL_PARAM_OCTET_STRING = 4, 5
_OSSL_PARAM_UNMODIFIED = ctypes.c_size_t(-1).value
_IV_SIZE = 16

_P = ctypes.c_void_p
_SIGNATURES = {
    "SSL_CTX_get_timeout": (ctypes.c_long, _P),
    "SSL_CTX_set_tlsext_ticket_key_evp_cb": (ctypes.c_int, _P, _P),
    "SSL_get_SSL_CTX": (_P, _P),
    "OpenSSL_version_num": (ctypes.c_ulong,),
    "EVP_aes_256_cbc": (_P,),
    "EVP_EncryptInit_ex": (ctypes.c_int, _P, _P, _P, _P, _P),
    "EVP_DecryptInit_ex": (ctypes.c_int, _P, _P, _P, _P, _P),
    "EVP_MAC_CTX_set_params": (ctypes.c_int, _P, _P),
}
#: Functions of pyOpenSSL's binding whose wrappers in the extension prove that its symbol
#: table describes the library loaded.
_ANCHORS = ("SSL_CTX_get_timeout", "SSL_CTX_set_timeout", "SSL_CTX_new", "OpenSSL_version_num")
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, _P, _P, _P, _P, _P, ctypes.c_int)


@dataclass(frozen=True)
class TicketKeys:
    """The keys in use, as the supervisor hands them out: ``current`` encrypts, both open."""

    current: bytes
    previous: bytes | None = None

    @classmethod
    def make(cls) -> TicketKeys:
        """Fresh random keys, made in memory."""
        return cls(os.urandom(KEY_SIZE))

    def rotated(self) -> TicketKeys:
        """A new current key; this one's current becomes the previous, its previous goes."""
        return TicketKeys(os.urandom(KEY_SIZE), self.current)

    def to_bytes(self) -> bytes:
        return self.current + (self.previous or b"")

    @classmethod
    def from_bytes(cls, data: bytes) -> TicketKeys:
        if len(data) not in (KEY_SIZE, 2 * KEY_SIZE):
            raise ValueError(f"ticket keys of {len(data)} bytes")
        return cls(data[:KEY_SIZE], data[KEY_SIZE:] or None)


class _OSSLParam(ctypes.Structure):
    _fields_ = [
        ("key", ctypes.c_char_p),
        ("data_type", ctypes.c_uint),
        ("data", _P),
        ("data_size", ctypes.c_size_t),
        ("return_size", ctypes.c_size_t),
    ]


class _Key:
    """One key in C memory, with the HMAC parameters made once rather than per ticket."""

    def __init__(self, raw: bytes):
        self.name = raw[:NAME_SIZE]
        self._buffer = ctypes.create_string_buffer(raw, KEY_SIZE)
        address = ctypes.addressof(self._buffer)
        self.aes = address + NAME_SIZE + HMAC_SIZE
        self._digest = ctypes.create_string_buffer(b"SHA256")
        self.params = (_OSSLParam * 3)(
            _OSSLParam(
                b"key",
                _OSSL_PARAM_OCTET_STRING,
                address + NAME_SIZE,
                HMAC_SIZE,
                _OSSL_PARAM_UNMODIFIED,
            ),
            _OSSLParam(
                b"digest",
                _OSSL_PARAM_UTF8_STRING,
                ctypes.addressof(self._digest),
                len(self._digest.value),
                _OSSL_PARAM_UNMODIFIED,
            ),
        )
        self.params_address = ctypes.addressof(self.params)


class TicketKeyRing:
    """The ticket keys of this process, which ``update`` replaces at each rotation;
    contexts given the ring by ``share`` follow it at once."""

    def __init__(self, keys: TicketKeys):
        self.update(keys)

    def update(self, keys: TicketKeys) -> None:
        current = _Key(keys.current)
        previous = _Key(keys.previous) if keys.previous else None
        # One assignment: the callback sees the old pair or the new, never half.
        self._keys = (current, previous)
        self.keys = keys

    def for_encrypting(self) -> _Key:
        return self._keys[0]

    def for_decrypting(self, name: bytes) -> tuple[_Key | None, bool]:
        """The key named ``name`` and whether it is the current one."""
        current, previous = self._keys
        if name == current.name:
            return current, True
        if previous is not None and name == previous.name:
            return previous, False
        return None, False


class _Elf:
    """The defined functions of a 64-bit little-endian ELF file's symbol table, by name."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            self._data = f.read()
        data = self._data
        if data[:6] != b"\x7fELF\x02\x01":
            raise LookupError(f"{path}: not a 64-bit little-endian ELF file")
        (section_offset,) = struct.unpack_from("<Q", data, 0x28)
        entry_size, count = struct.unpack_from("<HH", data, 0x3A)
        sections = [
            struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size)
            for i in range(count)
        ]
        symtabs = [s for s in sections if s[1] == 2]  # SHT_SYMTAB
        if not symtabs:
            raise LookupError(f"{path}: no symbol table (a stripped build)")
        self._symtab = symtabs[0]
        strtab = sections[self._symtab[6]]
        self._strings = data[strtab[4] : strtab[4] + strtab[5]]

    def functions(self, names) -> dict[str, int]:
        """The offset of each of ``names`` the file defines once as a function."""
        wanted = {}
        for name in names:
            at = self._strings.find(b"\0" + name.encode() + b"\0")
            if at >= 0:
                wanted[at + 1] = name
        found: dict[str, set[int]] = {}
        table = self._data[self._symtab[4] : self._symtab[4] + self._symtab[5]]
        for name_at, info, _, section, value, _ in struct.iter_unpack("<IBBHQQ", table):
            if name_at in wanted and info & 0xF == 2 and section != 0:  # STT_FUNC, defined
                found.setdefault(wanted[name_at], set()).add(value)
        return {name: values.pop() for name, values in found.items() if len(values) == 1}


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", _P),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", _P),
    ]


def _binding():
    """pyOpenSSL's cffi binding of OpenSSL: its ``ffi`` and the ``lib`` cffi made."""
    try:
        from cryptography.hazmat.bindings._rust import _openssl  # cryptography >= 42

        return _openssl.ffi, _openssl.lib
    except ImportError:
        from cryptography.hazmat.bindings._openssl import ffi, lib

        return ffi, lib


class _OpenSSL:
    """OpenSSL's functions that pyOpenSSL does not expose, proved to be its library's."""

    def __init__(self):
        self._ffi, self._lib = _binding()
        addresses = self._addresses()
        for name, (result, *arguments) in _SIGNATURES.items():
            setattr(self, name, ctypes.CFUNCTYPE(result, *arguments)(addresses[name]))
        self._prove()
        self.cipher = self.EVP_aes_256_cbc()
        self.callback = _CALLBACK(self._ticket_key)
        #: SSL_CTX address -> the ring of that context.
        self.rings: dict[int, TicketKeyRing] = {}

    def _wrapper(self, name: str) -> int:
        return int(self._ffi.cast("uintptr_t", self._ffi.addressof(self._lib, name)))

    def _addresses(self) -> dict[str, int]:
        info = _DlInfo()
        libdl = ctypes.CDLL(ctypes.util.find_library("dl") or None)
        if not libdl.dladdr(_P(self._wrapper(_ANCHORS[0])), ctypes.byref(info)):
            raise LookupError("dladdr does not know pyOpenSSL's binding")
        path, base = os.fsdecode(info.dli_fname), info.dli_fbase
        try:
            offsets = _Elf(path).functions(
                [*_SIGNATURES, *(f"_cffi_d_{name}" for name in _ANCHORS)]
            )
        except LookupError as e:
            stripped, offsets = str(e), {}
        else:
            stripped = f"{path}: OpenSSL's functions are not in its symbol table"
        addresses = {name: base + offsets[name] for name in _SIGNATURES if name in offsets}
        if addresses:
            # A static OpenSSL: its symbol table must be the loaded file's, to the byte.
            for name in _ANCHORS:
                offset = offsets.get(f"_cffi_d_{name}")
                if offset is None or base + offset != self._wrapper(name):
                    raise LookupError(f"{path}: its symbol table is not of the library loaded")
        missing = [name for name in _SIGNATURES if name not in addresses]
        if missing:
            # A build that links the system's OpenSSL: the libraries are loaded already,
            # and dlopen hands back those very ones (which _prove checks).
            for soname in ("libssl.so.3", "libcrypto.so.3"):
                try:
                    library = ctypes.CDLL(soname)
                except OSError:
                    continue
                for name in list(missing):
                    try:
                        addresses[name] = ctypes.cast(getattr(library, name), _P).value
                        missing.remove(name)
                    except AttributeError:
                        pass
        if missing:
            raise LookupError(f"{stripped}, and no system libssl.so.3 has them")
        return addresses

    def _prove(self) -> None:
        if self.OpenSSL_version_num() != self._lib.OpenSSL_version_num():
            raise LookupError("the OpenSSL found is not pyOpenSSL's (another version)")
        context = SSL.Context(SSL.TLS_METHOD)
        timeout = 7000 + int.from_bytes(os.urandom(2), "big")
        context.set_timeout(timeout)
        if self.SSL_CTX_get_timeout(self.address(context)) != timeout:
            raise LookupError("the OpenSSL found is not pyOpenSSL's (another instance)")

    def address(self, context: SSL.Context) -> int:
        return int(self._ffi.cast("uintptr_t", context._context))

    def share(self, context: SSL.Context, ring: TicketKeyRing) -> None:
        address = self.address(context)
        context.set_session_id(SESSION_ID_CONTEXT)
        if self.SSL_CTX_set_tlsext_ticket_key_evp_cb(address, self.callback) != 1:
            raise SSL.Error("SSL_CTX_set_tlsext_ticket_key_evp_cb failed")
        self.rings[address] = ring
        weakref.finalize(context, self.rings.pop, address, None)

    def _ticket_key(self, ssl, name, iv, cipher_context, mac_context, encrypt) -> int:
        """OpenSSL's ticket-key callback: runs for each ticket made or opened."""
        try:
            ring = self.rings.get(self.SSL_get_SSL_CTX(ssl))
            if ring is None:
                return _ERROR
            if encrypt:
                key = ring.for_encrypting()
                ctypes.memmove(name, key.name, NAME_SIZE)
                ctypes.memmove(iv, os.urandom(_IV_SIZE), _IV_SIZE)
                init, found = self.EVP_EncryptInit_ex, _OK
            else:
                key, current = ring.for_decrypting(ctypes.string_at(name, NAME_SIZE))
                if key is None:
                    return _NOT_FOUND  # an older key's, or another server's: full handshake
                init, found = self.EVP_DecryptInit_ex, _OK if current else _OK_RENEW
            if init(cipher_context, self.cipher, None, key.aes, iv) != 1:
                return _ERROR
            if self.EVP_MAC_CTX_set_params(mac_context, key.params_address) != 1:
                return _ERROR
            return found
        except Exception:
            return _ERROR


_lock = threading.Lock()
_openssl: _OpenSSL | None = None
_unavailable: str | None = None


def _functions() -> _OpenSSL | None:
    """The proved OpenSSL functions, found once; None (and why) where they cannot be."""
    global _openssl, _unavailable
    with _lock:
        if _openssl is None and _unavailable is None:
            try:
                _openssl = _OpenSSL()
            except Exception as e:
                _unavailable = str(e) or type(e).__name__
                log.warn(  # noqa: G010 (twisted.logger has no warning())
                    "tls.ticket_keys_local: {reason}; TLS sessions resume only on the worker "
                    "that issued the ticket. Fix: install a cryptography whose OpenSSL "
                    "popserv can reach (PyPI's wheel as published, or one built against the "
                    "system's: pip install --no-binary cryptography cryptography)",
                    reason=_unavailable,
                )
        return _openssl


def unavailable() -> str | None:
    """Why this process cannot share ticket keys, or None when it can."""
    _functions()
    return _unavailable


def share(context: SSL.Context, ring: TicketKeyRing) -> bool:
    """Have ``context`` make and open its tickets with ``ring``'s keys; False (with one
    warning per process) where OpenSSL cannot be reached, and the context keeps its own."""
    functions = _functions()
    if functions is None:
        return False
    functions.share(context, ring)
    return True
