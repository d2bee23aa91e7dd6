#!/usr/bin/env python3
"""Edits a LUKS header the way a hostile user would, keeping it valid for libcryptsetup.

LUKS2: `luks_edit.py IMAGE PATH=JSON ...` sets a field of the JSON metadata in both header
copies (e.g. `keyslots.0.kdf.iterations=4294967295`, `segments.0.iv_tweak="8"`) and recomputes
each copy's SHA-256 checksum, so cryptsetup accepts the result. A value of `null` deletes.
LUKS1: `luks_edit.py IMAGE luks1.keyslot.N.iterations=V` or `luks1.digest_iterations=V` patches
the phdr (it has no checksum).

`--secondary-only` edits only the LUKS2 secondary copy; `--break-primary` then spoils the
primary's checksum, so libcryptsetup falls back to the (edited) secondary.
"""
import hashlib
import json
import struct
import sys

CSUM_OFFSET = 448
CSUM_LEN = 64


def set_path(doc, path, value):
    *parents, last = path.split(".")
    for key in parents:
        doc = doc[key]
    if value is None:
        del doc[last]
    else:
        doc[last] = value


def edit_luks2(f, edits, offsets_wanted):
    f.seek(0)
    primary = f.read(16)
    hdr_size = struct.unpack(">Q", primary[8:16])[0]
    for offset in [o for o in (0, hdr_size) if offsets_wanted(o, hdr_size)]:
        f.seek(offset)
        header = bytearray(f.read(hdr_size))
        assert header[:6] in (b"LUKS\xba\xbe", b"SKUL\xba\xbe"), header[:6]
        area = header[4096:]
        doc = json.loads(area[: area.index(0)].decode())
        for path, value in edits:
            set_path(doc, path, value)
        text = json.dumps(doc, separators=(",", ":")).encode()
        assert len(text) < len(area), "JSON grew past its area"
        header[4096:] = text + bytes(len(area) - len(text))
        header[CSUM_OFFSET : CSUM_OFFSET + CSUM_LEN] = bytes(CSUM_LEN)
        digest = hashlib.sha256(bytes(header)).digest()
        header[CSUM_OFFSET : CSUM_OFFSET + len(digest)] = digest
        f.seek(offset)
        f.write(header)


def edit_luks1(f, edits):
    for path, value in edits:
        parts = path.split(".")
        if parts[1] == "digest_iterations":
            at = 164
        elif parts[1] == "keyslot" and parts[3] == "iterations":
            at = 208 + int(parts[2]) * 48 + 4
        else:
            raise SystemExit(f"unknown LUKS1 field {path}")
        f.seek(at)
        f.write(struct.pack(">I", int(value)))


def break_primary(f):
    f.seek(CSUM_OFFSET)
    first = f.read(1)
    f.seek(CSUM_OFFSET)
    f.write(bytes([first[0] ^ 0xFF]))


def main():
    args = sys.argv[1:]
    secondary_only = "--secondary-only" in args
    spoil_primary = "--break-primary" in args
    image, *assignments = [a for a in args if a not in ("--secondary-only", "--break-primary")]
    edits = []
    for assignment in assignments:
        path, _, value = assignment.partition("=")
        edits.append((path, json.loads(value)))
    with open(image, "r+b") as f:
        version = struct.unpack(">H", f.read(8)[6:8])[0]
        if version == 2:
            edit_luks2(f, edits, lambda o, size: o == size or not secondary_only)
            if spoil_primary:
                break_primary(f)
        else:
            edit_luks1(f, edits)


if __name__ == "__main__":
    main()
