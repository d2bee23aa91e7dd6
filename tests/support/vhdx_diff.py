#!/usr/bin/env python3
"""Writes a differencing VHDX over a parent VHDX, per MS-VHDX 1.0 (qemu-img cannot make one).

  vhdx_diff.py PARENT CHILD --size BYTES [--block-size BYTES] [--sector 512|4096]
               [--relative-path P] [--volume-path P] [--absolute-win32-path P]
               [--linkage GUID] [--write OFFSET:LENGTH:BYTE ...] [--zero-block N ...]

The child has: the file identifier; two headers with CRC-32C (the second current); a region
table (and its copy) with the BAT and metadata regions; an empty 1 MiB log; the metadata
items (file parameters with has-parent, virtual size, page 83, logical and physical sector
sizes, the parent locator with parent_linkage = the parent's DataWriteGuid unless --linkage
says otherwise); the BAT with sector bitmap entries; then the sector bitmap blocks and the
payload blocks.

Each --write fills LENGTH bytes from OFFSET (multiples of the logical sector) with BYTE in
the child. A block all of whose sectors are written is FULLY_PRESENT; a block with some is
PARTIALLY_PRESENT, its sector bitmap (one bit per logical sector, least significant first)
marking them; a --zero-block is ZERO (reads as zeros, whatever the parent holds); every
other block is NOT_PRESENT (read from the parent).
"""

import argparse
import struct
import uuid

MIB = 1 << 20
BAT_GUID = uuid.UUID("2dc27766-f623-4200-9d64-115e9bfd4a08")
METADATA_GUID = uuid.UUID("8b7ca206-4790-4b9a-b8fe-575f050f886e")
FILE_PARAMETERS = uuid.UUID("caa16737-fa36-4d43-b3b6-33f0aa44e76b")
VIRTUAL_DISK_SIZE = uuid.UUID("2fa54224-cd1b-4876-b211-5dbed83bf4b8")
PAGE_83 = uuid.UUID("beca12ab-b2e6-4523-93ef-c309e000c746")
LOGICAL_SECTOR = uuid.UUID("8141bf1d-a96f-4709-ba47-f233a8faab5f")
PHYSICAL_SECTOR = uuid.UUID("cda348c7-445d-4471-9cc9-e9885251c556")
PARENT_LOCATOR = uuid.UUID("a8d35f2d-b30b-454d-abf7-d3d84834ab0c")
VHDX_LOCATOR_TYPE = uuid.UUID("b04aefb7-d19e-4a81-b789-25b8e9445913")


def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def seal(buffer, start, length):
    """Stores the CRC-32C of buffer[start:start+length] (checksum field at +4 read as 0)."""
    buffer[start + 4:start + 8] = b"\0\0\0\0"
    crc = crc32c(bytes(buffer[start:start + length]))
    buffer[start + 4:start + 8] = struct.pack("<I", crc)


def parent_data_write_guid(path):
    """The DataWriteGuid of the parent's current header (the valid one, higher sequence)."""
    with open(path, "rb") as f:
        data = f.read(MIB)
    best = None
    for at in (64 * 1024, 128 * 1024):
        header = bytearray(data[at:at + 4096])
        stored = struct.unpack_from("<I", header, 4)[0]
        header[4:8] = b"\0\0\0\0"
        if header[:4] != b"head" or crc32c(bytes(header)) != stored:
            continue
        sequence = struct.unpack_from("<Q", header, 8)[0]
        if best is None or sequence > best[0]:
            best = (sequence, uuid.UUID(bytes_le=bytes(header[32:48])))
    if best is None:
        raise SystemExit(f"{path}: no valid VHDX header")
    return best[1]


def locator(pairs):
    """The parent locator item: header, key/value entries, UTF-16LE strings."""
    base = 20 + 12 * len(pairs)
    entries = b""
    strings = b""
    for key, value in pairs:
        key = key.encode("utf-16-le")
        value = value.encode("utf-16-le")
        key_at = base + len(strings)
        strings += key
        value_at = base + len(strings)
        strings += value
        entries += struct.pack("<IIHH", key_at, value_at, len(key), len(value))
    header = VHDX_LOCATOR_TYPE.bytes_le + struct.pack("<HH", 0, len(pairs))
    return header + entries + strings


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("parent")
    parser.add_argument("child")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--block-size", type=int, default=2 * MIB)
    parser.add_argument("--sector", type=int, default=512, choices=(512, 4096))
    parser.add_argument("--relative-path")
    parser.add_argument("--volume-path")
    parser.add_argument("--absolute-win32-path")
    parser.add_argument("--linkage")
    parser.add_argument("--write", action="append", default=[])
    parser.add_argument("--zero-block", type=int, action="append", default=[])
    args = parser.parse_args()

    block_size, sector, size = args.block_size, args.sector, args.size
    blocks = -(-size // block_size)
    chunk_ratio = (1 << 23) * sector // block_size
    chunks = -(-blocks // chunk_ratio)
    sectors_per_block = block_size // sector

    # Which sectors of which block the child holds, and their bytes.
    written = {}
    for spec in args.write:
        offset, length, byte = (int(x, 0) for x in spec.split(":"))
        assert offset % sector == 0 and length % sector == 0, spec
        for s in range(offset // sector, (offset + length) // sector):
            block, within = divmod(s, sectors_per_block)
            written.setdefault(block, {})[within] = byte

    bat_at, metadata_at, data_at = 2 * MIB, 3 * MIB, 4 * MIB
    bat_bytes = chunks * (chunk_ratio + 1) * 8
    assert bat_bytes <= MIB, "BAT region is 1 MiB here"
    out = bytearray(data_at)
    out[:8] = b"vhdxfile"
    creator = "imgcrypt tests".encode("utf-16-le")
    out[8:8 + len(creator)] = creator
    assert len(out) == data_at

    file_write, data_write = uuid.uuid4(), uuid.uuid4()
    for n, (at, sequence) in enumerate(((64 * 1024, 1), (128 * 1024, 2))):
        struct.pack_into("<4sIQ", out, at, b"head", 0, sequence)
        out[at + 16:at + 32] = file_write.bytes_le
        out[at + 32:at + 48] = data_write.bytes_le
        # No log GUID: nothing to replay. Log version 0, version 1, 1 MiB log at 1 MiB.
        struct.pack_into("<HHIQ", out, at + 64, 0, 1, MIB, MIB)
        seal(out, at, 4096)
    for at in (192 * 1024, 256 * 1024):
        struct.pack_into("<4sIII", out, at, b"regi", 0, 2, 0)
        out[at + 16:at + 32] = BAT_GUID.bytes_le
        struct.pack_into("<QII", out, at + 32, bat_at, MIB, 1)
        out[at + 48:at + 64] = METADATA_GUID.bytes_le
        struct.pack_into("<QII", out, at + 64, metadata_at, MIB, 1)
        seal(out, at, 64 * 1024)

    linkage = "{%s}" % (args.linkage or parent_data_write_guid(args.parent))
    pairs = [("parent_linkage", linkage)]
    for key in ("relative_path", "volume_path", "absolute_win32_path"):
        value = getattr(args, key)
        if value is not None:
            pairs.append((key, value))
    items = [
        (FILE_PARAMETERS, struct.pack("<II", block_size, 2), 4),
        (VIRTUAL_DISK_SIZE, struct.pack("<Q", size), 6),
        (PAGE_83, uuid.uuid4().bytes_le, 6),
        (LOGICAL_SECTOR, struct.pack("<I", sector), 6),
        (PHYSICAL_SECTOR, struct.pack("<I", sector), 6),
        (PARENT_LOCATOR, locator(pairs), 4),
    ]
    struct.pack_into("<8sHH", out, metadata_at, b"metadata", 0, len(items))
    item_at = 64 * 1024
    for index, (guid, value, flags) in enumerate(items):
        entry = metadata_at + 32 + 32 * index
        out[entry:entry + 16] = guid.bytes_le
        struct.pack_into("<III", out, entry + 16, item_at, len(value), flags)
        out[metadata_at + item_at:metadata_at + item_at + len(value)] = value
        item_at += -(-len(value) // 4096) * 4096

    # Sector bitmap blocks first (one per chunk that has a partly present block), then the
    # payload blocks, each 1 MiB aligned.
    next_at = data_at
    tail = bytearray()

    def allocate(length):
        nonlocal next_at
        at = next_at
        tail.extend(bytes(length))
        next_at += -(-length // MIB) * MIB
        tail.extend(bytes(next_at - at - length))
        return at

    bitmap_at = {}
    for block, sectors in sorted(written.items()):
        if len(sectors) < sectors_per_block and block // chunk_ratio not in bitmap_at:
            bitmap_at[block // chunk_ratio] = allocate(MIB)
    for chunk, at in bitmap_at.items():
        struct.pack_into("<Q", out, bat_at + ((chunk + 1) * (chunk_ratio + 1) - 1) * 8, at | 6)
    for block in range(blocks):
        entry_at = bat_at + (block + block // chunk_ratio) * 8
        sectors = written.get(block)
        if block in args.zero_block:
            struct.pack_into("<Q", out, entry_at, 2)
            continue
        if not sectors:
            continue  # NOT_PRESENT: in the parent
        at = allocate(block_size)
        state = 6 if len(sectors) == sectors_per_block else 7
        struct.pack_into("<Q", out, entry_at, at | state)
        for within, byte in sectors.items():
            start = at - data_at + within * sector
            tail[start:start + sector] = bytes([byte]) * sector
        if state == 7:
            bitmap = bitmap_at[block // chunk_ratio] - data_at
            first_bit = (block % chunk_ratio) * sectors_per_block
            for within in sectors:
                bit = first_bit + within
                tail[bitmap + bit // 8] |= 1 << (bit % 8)
    with open(args.child, "wb") as f:
        f.write(out)
        f.write(tail)


if __name__ == "__main__":
    main()
