#!/usr/bin/env python3
"""Which tables and indexes a SQLite database's commits write, from its WAL.

    bench/wal-pages.py copy.db      # copy.db-wal beside it

Copy the database and its -wal file while the server runs (a server that stops cleanly
checkpoints and removes its WAL). Reads the frames written since the WAL last started over,
groups them into commits, and names each frame's page with SQLite's `dbstat` table. Prints
frames per commit and, per table or index and page type, frames per commit. Each frame is one
page written to the WAL and fsynced with its commit.
"""
import collections
import sqlite3
import struct
import sys


def frames(wal):
    """(page number, commit size) of each frame with the WAL header's salts."""
    _magic, _ver, page_size, _seq, salt1, salt2, _c1, _c2 = struct.unpack(">8I", wal[:32])
    size, off = 24 + page_size, 32
    while off + size <= len(wal):
        page, commit, s1, s2 = struct.unpack(">4I", wal[off:off + 16])
        if (s1, s2) != (salt1, salt2):
            break
        yield page, commit
        off += size


def main(db):
    with open(db + "-wal", "rb") as f:
        wal = f.read()
    owners = {}
    with sqlite3.connect(db) as con:
        for name, page, kind in con.execute("SELECT name, pageno, pagetype FROM dbstat"):
            owners[page] = (name, kind)
    commits, current = [], []
    for page, commit in frames(wal):
        current.append(page)
        if commit:
            commits.append(current)
            current = []
    if not commits:
        print("no complete commit in the WAL")
        return
    total = sum(map(len, commits))
    print(f"{len(commits)} commits, {total / len(commits):.1f} frames per commit")
    count = collections.Counter(owners.get(p, ("?", "?")) for c in commits for p in c)
    for (name, kind), n in count.most_common():
        print(f"{n / len(commits):7.2f}  {name} ({kind})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
