#!/usr/bin/env python3
"""Independent reader of a blktap-encrypted VHD (`vhd-util copy -k`), for tests.

Written from the format's facts (the VHD specification and xapi-project/blktap: include/vhd.h,
vhd/lib/libvhd.c, drivers/crypto/xts_aes.[ch], drivers/block-crypto.c, drivers/block-vhd.c),
sharing no code with imgcrypt. It reads the guest's disk the way tapdisk does:

- footer at the end of the file (or its copy at 0), big-endian; dynamic header at the footer's
  data offset: BAT offset, max table entries, block size;
- batmap header at BAT offset + roundup512(4 * entries): cookie "tdbatmap", map offset, map
  sectors, version, checksum, marker, then the key hash {cookie 1, nonce[32], hash[32]};
- the key hash must equal SHA-256(nonce || key), else exit status 3 (wrong key);
- in an allocated block, a sector is present if the block's batmap bit or the sector's bitmap
  bit is set (most significant bit first); present sectors are decrypted with AES-XTS
  (AES-128 for a 32-byte key, AES-256 for 64), one 512-byte data unit each, tweak = guest
  sector number mod 2**32 as 4 little-endian bytes, then 12 zero bytes; everything else is
  zeros.

usage: vhd_decrypt.py IMAGE RAW_KEY_FILE OUTPUT
  Writes the guest disk to OUTPUT (sparse: only allocated blocks are written) and prints one
  JSON line of facts: virtual_size, key_hash, nonce, allocated_blocks, block_data_offsets,
  batmap_checksum_ok.
"""
import hashlib
import json
import struct
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SECTOR = 512


def be32(data: bytes, at: int) -> int:
    return struct.unpack_from(">I", data, at)[0]


def be64(data: bytes, at: int) -> int:
    return struct.unpack_from(">Q", data, at)[0]


def bit(map_bytes: bytes, index: int) -> bool:
    byte = index // 8
    return byte < len(map_bytes) and bool(map_bytes[byte] & (0x80 >> (index % 8)))


def main() -> None:
    image_path, key_path, output_path = sys.argv[1:4]
    with open(key_path, "rb") as f:
        key = f.read()
    if len(key) not in (32, 64):
        sys.exit(f"raw key is {len(key)} bytes, expected 32 or 64")
    with open(image_path, "rb") as image:
        image.seek(0, 2)
        size = image.tell()

        def read(at: int, length: int) -> bytes:
            image.seek(at)
            data = image.read(length)
            if len(data) != length:
                sys.exit(f"short read at {at}")
            return data

        footer = read(size - 512, 512)
        if footer[:8] != b"conectix":
            footer = read(0, 512)
        if footer[:8] != b"conectix":
            sys.exit("no VHD footer")
        if be32(footer, 60) != 3:
            sys.exit("not a dynamic VHD")
        current_size = be64(footer, 48)
        header = read(be64(footer, 16), 1024)
        if header[:8] != b"cxsparse":
            sys.exit("no dynamic header")
        table_offset = be64(header, 16)
        entries = be32(header, 28)
        block_size = be32(header, 32)
        sectors_per_block = block_size // SECTOR
        bitmap_bytes = -(-(sectors_per_block // 8) // SECTOR) * SECTOR
        table = read(table_offset, entries * 4)
        bat = [be32(table, 4 * i) for i in range(entries)]

        batmap_at = table_offset + -(-(entries * 4) // SECTOR) * SECTOR
        batmap = read(batmap_at, 512)
        if batmap[:8] != b"tdbatmap":
            sys.exit("no batmap header")
        map_offset, map_sectors = be64(batmap, 8), be32(batmap, 16)
        stored_checksum = be32(batmap, 24)
        if batmap[29] != 1:
            sys.exit("no key hash: not an encrypted VHD")
        nonce, key_hash = batmap[30:62], batmap[62:94]
        if hashlib.sha256(nonce + key).digest() != key_hash:
            print(json.dumps({"error": "wrong key", "key_hash": key_hash.hex()}))
            sys.exit(3)
        # libvhd reads and checksums roundup512(current_size >> 24) bytes of the map (at least
        # one sector); beyond them tapdisk reads outside its buffer, so bits there are ignored.
        checked = max(1, -(-(current_size >> 24) // SECTOR)) * SECTOR
        full = read(map_offset, min(checked, map_sectors * SECTOR))
        checksum_ok = (~sum(full)) & 0xFFFFFFFF == stored_checksum
        if not checksum_ok:
            full = b""

        allocated, offsets = [], []
        with open(output_path, "wb") as out:
            out.truncate(current_size)
            for block, entry in enumerate(bat):
                if entry == 0xFFFFFFFF or block * block_size >= current_size:
                    continue
                allocated.append(block)
                bitmap_at = entry * SECTOR
                offsets.append(bitmap_at + bitmap_bytes)
                bitmap = read(bitmap_at, bitmap_bytes)
                length = min(block_size, current_size - block * block_size)
                data = read(bitmap_at + bitmap_bytes, length)
                plain = bytearray(length)
                for i in range(length // SECTOR):
                    if not (bit(full, block) or bit(bitmap, i)):
                        continue
                    sector = block * sectors_per_block + i
                    tweak = (sector & 0xFFFFFFFF).to_bytes(4, "little") + bytes(12)
                    decryptor = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()
                    plain[i * SECTOR : (i + 1) * SECTOR] = (
                        decryptor.update(data[i * SECTOR : (i + 1) * SECTOR]) + decryptor.finalize()
                    )
                out.seek(block * block_size)
                out.write(plain)
    print(
        json.dumps(
            {
                "virtual_size": current_size,
                "key_hash": key_hash.hex(),
                "nonce": nonce.hex(),
                "allocated_blocks": allocated,
                "block_data_offsets": offsets,
                "batmap_checksum_ok": checksum_ok,
            }
        )
    )


if __name__ == "__main__":
    main()
