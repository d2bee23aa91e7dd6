#!/usr/bin/env python3
"""Independent AES-XTS (dm-crypt's plain64 and plain IVs) for cross-checking the daemon, via
`cryptography`.

usage: xts.py encrypt|decrypt SECTOR_SIZE FIRST_SECTOR INPUT OFFSET LENGTH OUTPUT [plain64|plain]
The 32-byte (AES-128-XTS) or 64-byte (AES-256-XTS) key is read from standard input as hex
(never from the command line).
Reads LENGTH bytes of INPUT at OFFSET, treats them as consecutive encryption sectors of
SECTOR_SIZE bytes whose first is at 512-byte sector FIRST_SECTOR, and writes the result to
OUTPUT. Each sector is one XTS data unit whose tweak is its 512-byte sector number as a
little-endian integer padded to 16 bytes (dm-crypt's plain64 IV), or with `plain` that number
modulo 2**32 (dm-crypt's plain IV, blktap's encrypted VHD).
"""
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def main():
    mode, sector_size, first_sector, source, offset, length, target = sys.argv[1:8]
    iv_mode = sys.argv[8] if len(sys.argv) > 8 else "plain64"
    modulus = {"plain64": 2**64, "plain": 2**32}[iv_mode]
    sector_size, first_sector = int(sector_size), int(first_sector)
    offset, length = int(offset), int(length)
    key = bytes.fromhex(sys.stdin.read().strip())
    if len(key) not in (32, 64):
        sys.exit(f"key must be 32 or 64 bytes, got {len(key)}")
    if length % sector_size:
        sys.exit("length is not a multiple of the sector size")
    with open(source, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        sys.exit(f"short read: {len(data)} of {length} bytes")
    step = sector_size // 512
    out = bytearray()
    for index in range(length // sector_size):
        tweak = ((first_sector + index * step) % modulus).to_bytes(16, "little")
        cipher = Cipher(algorithms.AES(key), modes.XTS(tweak))
        op = cipher.encryptor() if mode == "encrypt" else cipher.decryptor()
        out += op.update(data[index * sector_size:(index + 1) * sector_size]) + op.finalize()
    with open(target, "wb") as f:
        f.write(out)


if __name__ == "__main__":
    main()
