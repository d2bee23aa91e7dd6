#!/usr/bin/env python3
"""Independent decryption of a LUKS payload, for tests.

Decrypts aes-xts-plain64 the way dm-crypt does, with Python's `cryptography` (OpenSSL), sharing
no code with imgcrypt: the volume key comes from `cryptsetup luksDump --dump-volume-key`, the
offset and sector size from `cryptsetup luksDump`.

usage: luks_decrypt.py IMAGE VOLUME_KEY_FILE DATA_OFFSET SECTOR_SIZE OUTPUT
"""
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def main() -> None:
    image, key_file, data_offset, sector_size, output = sys.argv[1:6]
    data_offset, sector_size = int(data_offset), int(sector_size)
    with open(key_file, "rb") as f:
        key = f.read()
    if len(key) != 64:
        sys.exit(f"volume key is {len(key)} bytes, expected 64")
    chunk = 1 << 20
    with open(image, "rb") as src, open(output, "wb") as dst:
        src.seek(data_offset)
        position = 0  # bytes from the start of the data segment
        while True:
            block = src.read(chunk)
            if not block:
                break
            if len(block) % sector_size:
                sys.exit(f"payload is not a whole number of {sector_size}-byte sectors")
            out = bytearray()
            for i in range(0, len(block), sector_size):
                # plain64: the IV is the 512-byte sector number, little-endian, zero-padded.
                iv = ((position + i) // 512).to_bytes(16, "little")
                decryptor = Cipher(algorithms.AES(key), modes.XTS(iv)).decryptor()
                out += decryptor.update(block[i : i + sector_size]) + decryptor.finalize()
            dst.write(out)
            position += len(block)


if __name__ == "__main__":
    main()
