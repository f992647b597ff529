"""A record layer of our own after a mutual-TLS handshake (bench/tls_probe.py's "aead" pair; a
probe, not a protocol to ship as it stands).

Python's `ssl` runs on the system OpenSSL (Debian 12: 3.0), whose AES-GCM does about half of what
the OpenSSL inside the `cryptography` wheel does on this CPU; and SSLSocket cannot `sendmsg`. So:
mutual TLS 1.3 as usual (identities verified, node ids read from the certificates), then each side
sends 32 random bytes over it, both derive one key per direction (HKDF-SHA256), close TLS
(`unwrap`: close_notify both ways) and go on on the plain socket with frames
`u32 length | 64-byte header | AES-128-GCM(payload) | 16-byte tag`, the length and header as
associated data, the nonce the frame's sequence number in that direction. The sender encrypts
each payload with `AESGCM.encrypt_into` into one reused buffer and `sendmsg`s the three buffers
unjoined; the receiver reads frames into per-frame buffers as the plaintext plane does and
decrypts each in place with `decrypt_into`. One pass over the bytes each way, like kernel TLS.

What a real protocol would add: the end frame and the verdict authenticated too (here they travel
in the clear), a key-update or reconnect before 2^32 frames, and RFC 8446's exporter instead of
the exchanged secret where the ssl module offers one (Python 3.11's does not).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

TAG = 16
NONCE = struct.Struct("<4xQ")
SECRET = 32


async def _exchange(tls: ssl.SSLSocket, server: bool, tls_call: Any) -> tuple[AESGCM, AESGCM]:
    """(key for what this side sends, key for what it receives), from secrets swapped over TLS."""
    mine = os.urandom(SECRET)
    await tls_call(tls, tls.send, mine)
    theirs = b""
    while len(theirs) < SECRET:
        got = await tls_call(tls, tls.recv, SECRET - len(theirs))
        if not got:
            raise ConnectionError("closed during the key exchange")
        theirs += got
    client, srv = (theirs, mine) if server else (mine, theirs)

    def key(label: bytes) -> AESGCM:
        return AESGCM(HKDF(hashes.SHA256(), 16, salt=None, info=b"prfaas kv " + label).derive(client + srv))

    c2s, s2c = key(b"client to server"), key(b"server to client")
    return (s2c, c2s) if server else (c2s, s2c)


async def upgrade(tls: ssl.SSLSocket, server: bool, tls_call: Any) -> tuple[socket.socket, AESGCM, AESGCM]:
    """Keys from the verified TLS session, then TLS closed: (plain socket, send key, receive key)."""
    send_key, recv_key = await _exchange(tls, server, tls_call)
    await tls_call(tls, tls.unwrap)  # close_notify both ways; returns the SSLSocket itself, TLS-less
    plain = socket.socket(tls.family, tls.type, tls.proto, fileno=tls.detach())
    plain.setblocking(False)
    return plain, send_key, recv_key


async def send_frames(sock: socket.socket, key: AESGCM, src: Any, ends: Any) -> None:
    ct = bytearray(src.frame + TAG)
    for seq, (_, header, payload) in enumerate(src.frames()):
        length = ends.LEN.pack(len(header) + len(payload) + TAG)
        key.encrypt_into(NONCE.pack(seq), payload, length + header, ct)
        await ends.send_buffers(sock, [length, header, ct])  # returns once the kernel has all of ct


def decrypt_frame(key: AESGCM, seq: int, frame: memoryview, header_size: int, len_struct: Any) -> memoryview:
    """Decrypts a frame's payload in place (InvalidTag when it was altered); the plaintext view."""
    body = frame[header_size:]
    plain = body[: len(body) - TAG]
    key.decrypt_into(NONCE.pack(seq), body, len_struct.pack(len(frame)) + bytes(frame[:header_size]), plain)
    return plain


async def accept_plain(sock: socket.socket, protocol: Any) -> None:
    """The plaintext plane's receiver (a BufferedProtocol) on the upgraded socket."""
    await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, sock)
