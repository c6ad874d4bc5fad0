# AES-256-CTR keystreams for protocols/cipher.py's SampleCipher on CPython
# (the hub, tools, tests): `cryptography`'s AES-ECB encryptor over the
# counter blocks, all of a message's blocks in one call (a CTR context of
# `cryptography` per frame cost more in Python than the AES). A board never
# loads this module: MicroPython's cryptolib gives it ECB blocks, and its
# code would only take the board's RAM.
from typing import Any

_COUNTER_BLOCKS = 256  # the counter blocks of any frame (4096 bytes at most), made at first use
_COUNTERS: "list[bytes]" = []
# By number of blocks from a message's start: (their counters as an integer,
# 1 at bit 64 of every block: times (epoch << 32 | seq), every block's top 64 bits).
_FROM_START: "dict[int, tuple[int, int]]" = {}


def encryptor(key: bytes) -> Any:
    # The key's AES-ECB encryptor (made once a key).
    from cryptography.hazmat.primitives.ciphers import (  # type: ignore[import-not-found, unused-ignore]
        Cipher,
        algorithms,
        modes,
    )

    if not _COUNTERS:
        _COUNTERS.append(b"".join([bytes(12) + b.to_bytes(4, "big") for b in range(_COUNTER_BLOCKS)]))
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor()


def keystream(ecb: Any, epoch: int, seq: int, offset: int, n: int) -> bytes:
    # n bytes of the keystream of (epoch, seq) from byte offset. The counter
    # blocks of a message from its start are made as one integer: (epoch,
    # seq) in every block's top 64 bits (a product with 1 every 128 bits)
    # ORed with the blocks' counters (made once a size).
    first, skip = offset >> 4, offset & 15
    blocks = ((offset + n - 1) >> 4) - first + 1
    size = 16 * blocks
    if first == 0 and blocks <= _COUNTER_BLOCKS:
        made = _FROM_START.get(blocks)
        if made is None:
            made = _FROM_START[blocks] = (int.from_bytes(_COUNTERS[0][:size], "big"),
                                          sum(1 << (128 * i + 64) for i in range(blocks)))
        ctr = (((epoch << 32) | seq) * made[1] | made[0]).to_bytes(size, "big")
    elif first + blocks <= _COUNTER_BLOCKS:  # the counters (bytes 12-15) from the table, the rest ORed in
        prefix = epoch.to_bytes(4, "big") + seq.to_bytes(4, "big")
        ctr = (int.from_bytes(_COUNTERS[0][16 * first:16 * first + size], "big")
               | int.from_bytes((prefix + bytes(8)) * blocks, "big")).to_bytes(size, "big")
    else:
        prefix = epoch.to_bytes(4, "big") + seq.to_bytes(4, "big")
        ctr = b"".join([prefix + bytes(4) + b.to_bytes(4, "big") for b in range(first, first + blocks)])
    stream: bytes = ecb.update(ctr)
    return stream[skip:skip + n] if skip or len(stream) != n else stream


def opened(ecb: Any, data: bytes, epoch: int, seq: int) -> bytes:
    # data XORed with the keystream of (epoch, seq) from its first byte, as new bytes.
    n = len(data)
    if not n:
        return b""
    return (int.from_bytes(data, "big") ^ int.from_bytes(keystream(ecb, epoch, seq, 0, n), "big")).to_bytes(n, "big")


def xor_into(ecb: Any, buf: "bytearray | memoryview", start: int, end: int, epoch: int, seq: int,
             offset: int) -> None:
    # buf[start:end] XORed in place with the keystream of (epoch, seq) from byte offset.
    n = end - start
    if n <= 0:
        return
    data = int.from_bytes(bytes(buf[start:end]), "big") ^ int.from_bytes(keystream(ecb, epoch, seq, offset, n), "big")
    buf[start:end] = data.to_bytes(n, "big")
