#!/usr/bin/env python3
"""Writes a differencing VHD over an existing VHD parent, for tests (qemu-img cannot make one).

Written from the VHD specification (Microsoft, "Virtual Hard Disk Image Format Specification"
1.0: hard disk footer, dynamic disk header with parent fields and parent locators, BAT, blocks
of sector bitmap + data), sharing no code with imgcrypt:

- footer (512 bytes, big-endian): cookie "conectix", features 2, version 1.0, data offset 512,
  time stamp (seconds since 2000-01-01 UTC), creator application, creator version and host OS,
  original and current size, geometry (copied from the parent, so both are sized by the same
  rule), disk type 4, checksum (one's complement of the byte sum), unique id, saved state 0;
  the same footer as a copy at offset 0 and at the end;
- dynamic header (1024 bytes at 512): cookie "cxsparse", data offset all ones, table offset,
  version 1.0, max table entries, block size, checksum, parent unique id (the parent footer's),
  parent time stamp (the parent footer's), parent unicode name (UTF-16BE), eight parent
  locator entries (code, data space in bytes as Hyper-V writes it, data length, reserved,
  data offset);
- locator data after the BAT, each padded to whole sectors: W2ru and W2ku UTF-16LE, MacX a
  UTF-8 file:// URL;
- one block per touched 2 MiB of the guest: a 512-byte sector bitmap (bit 7 of byte 0 is
  sector 0), then the data. Sectors written get the pattern; the block's other sectors hold
  0xEE filler, which a reader honouring the bitmap never shows.

usage: vhd_diff.py PARENT PARENT_RAW CHILD EXPECTED [--locator CODE:TEXT]... [--name NAME]
                   [--write OFFSET:LENGTH:BYTE]... [--parent-timestamp N]
  PARENT_RAW is the parent's guest disk (`qemu-img convert -O raw`); EXPECTED gets that disk
  with the child's sectors applied: what the differencing disk holds. Prints one JSON line of
  facts about the child written.
"""
import argparse
import json
import shutil
import struct
import sys
import time

SECTOR = 512
BLOCK = 2 << 20
CODES = {"w2ru": b"W2ru", "w2ku": b"W2ku", "macx": b"MacX"}


def checksum(data: bytes) -> int:
    return ~sum(data) & 0xFFFFFFFF


def parent_footer(path: str) -> bytes:
    with open(path, "rb") as f:
        f.seek(-SECTOR, 2)
        footer = f.read(SECTOR)
    if footer[:8] != b"conectix":
        sys.exit(f"{path}: no VHD footer at its end")
    stored = struct.unpack_from(">I", footer, 64)[0]
    if checksum(footer[:64] + b"\0\0\0\0" + footer[68:]) != stored:
        sys.exit(f"{path}: footer checksum mismatch")
    return footer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("parent")
    parser.add_argument("parent_raw")
    parser.add_argument("child")
    parser.add_argument("expected")
    parser.add_argument("--locator", action="append", default=[])
    parser.add_argument("--name", default="")
    parser.add_argument("--write", action="append", default=[])
    parser.add_argument("--parent-timestamp", type=int)
    args = parser.parse_args()

    parent = parent_footer(args.parent)
    parent_timestamp = struct.unpack_from(">I", parent, 24)[0]
    if args.parent_timestamp is not None:
        parent_timestamp = args.parent_timestamp
    parent_uuid = parent[68:84]
    current_size = struct.unpack_from(">Q", parent, 48)[0]
    shutil.copyfile(args.parent_raw, args.expected)
    with open(args.expected, "rb") as f:
        f.seek(0, 2)
        virtual_size = f.tell()

    # Which sectors the child holds, and their bytes.
    written = {}
    for spec in args.write:
        offset, length, value = (int(part, 0) for part in spec.split(":"))
        if offset % SECTOR or length % SECTOR or offset + length > virtual_size:
            sys.exit(f"write {spec}: not whole sectors inside the disk")
        for sector in range(offset // SECTOR, (offset + length) // SECTOR):
            written[sector] = bytes([value]) * SECTOR
    blocks = sorted({sector * SECTOR // BLOCK for sector in written})

    entries = (virtual_size + BLOCK - 1) // BLOCK
    table_at = 3 * SECTOR
    table_bytes = (entries * 4 + SECTOR - 1) // SECTOR * SECTOR
    locators = []
    at = table_at + table_bytes
    for spec in args.locator:
        code, text = spec.split(":", 1)
        data = text.encode("utf-8") if code == "macx" else text.encode("utf-16-le")
        space = (len(data) + SECTOR - 1) // SECTOR * SECTOR
        locators.append((CODES[code], data, at, space))
        at += space
    first_block = at
    bitmap_bytes = SECTOR  # 4096 sectors per block: 512 bytes of bits, already whole sectors.
    span = bitmap_bytes + BLOCK
    end = first_block + span * len(blocks)

    footer = bytearray(SECTOR)
    footer[0:8] = b"conectix"
    struct.pack_into(">IIQI", footer, 8, 2, 0x00010000, SECTOR, int(time.time()) - 946684800)
    footer[28:32] = parent[28:32]  # creator application: the same size rule as the parent
    footer[32:40] = parent[32:40]  # creator version, host OS
    struct.pack_into(">QQ", footer, 40, current_size, current_size)
    footer[56:60] = parent[56:60]  # geometry
    struct.pack_into(">I", footer, 60, 4)
    footer[68:84] = bytes((0xC0 + i) % 256 for i in range(16))
    struct.pack_into(">I", footer, 64, checksum(footer))

    header = bytearray(1024)
    header[0:8] = b"cxsparse"
    struct.pack_into(">QQIII", header, 8, 0xFFFFFFFFFFFFFFFF, table_at, 0x00010000, entries, BLOCK)
    header[40:56] = parent_uuid
    struct.pack_into(">I", header, 56, parent_timestamp)
    name = args.name.encode("utf-16-be")[:512]
    header[64:64 + len(name)] = name
    for index, (code, data, offset, space) in enumerate(locators):
        entry = 576 + 24 * index
        header[entry:entry + 4] = code
        struct.pack_into(">IIIQ", header, entry + 4, space, len(data), 0, offset)
    struct.pack_into(">I", header, 36, checksum(header))

    image = bytearray(end + SECTOR)
    image[0:SECTOR] = footer
    image[SECTOR:3 * SECTOR] = header
    image[table_at:table_at + table_bytes] = b"\xff" * table_bytes
    for code, data, offset, space in locators:
        image[offset:offset + len(data)] = data
    for position, block in enumerate(blocks):
        at = first_block + span * position
        struct.pack_into(">I", image, table_at + 4 * block, at // SECTOR)
        image[at + bitmap_bytes:at + span] = b"\xee" * BLOCK
        for sector in range(block * BLOCK // SECTOR, (block + 1) * BLOCK // SECTOR):
            if sector in written:
                in_block = sector - block * BLOCK // SECTOR
                image[at + in_block // 8] |= 0x80 >> (in_block % 8)
                data_at = at + bitmap_bytes + in_block * SECTOR
                image[data_at:data_at + SECTOR] = written[sector]
    image[end:end + SECTOR] = footer
    with open(args.child, "wb") as f:
        f.write(image)

    with open(args.expected, "r+b") as f:
        for sector, data in sorted(written.items()):
            f.seek(sector * SECTOR)
            f.write(data)
    print(json.dumps({
        "virtual_size": virtual_size,
        "blocks": blocks,
        "sectors_written": len(written),
        "parent_uuid": parent_uuid.hex(),
        "parent_timestamp": parent_timestamp,
    }))


if __name__ == "__main__":
    main()
