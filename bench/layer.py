"""Copying a big file of the writable layer: into a checkpoint's tar (frozen: a Spot notice, a
file written in the last minute) and from the fetched tar onto a new rootfs (a restore).

Against a plain `cp --reflink=never` of the same file on the same file system, alternated in the
same run: on ext4 (this machine's disk) and on XFS made with reflink (a loop image), where
mmshim's copy shares the file's blocks. BENCH_LAYER_MIB MiB (default 1024), BENCH_PAIRS pairs
(default 7). Prints a table of ratios. Needs root and xfsprogs (install/setup-host.sh).
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from common import TABLE_HEAD, pairs, ratio_row, timed, timed_call

from mmshim import layer
from tests.disks import xfs

MIB = int(os.environ.get("BENCH_LAYER_MIB", "1024"))
PAIRS = int(os.environ.get("BENCH_PAIRS", "7"))
CHUNK = 4 << 20  # the store's chunk size: big files start at a multiple of it in the tar


def rows(root: Path, fs: str) -> list[str]:
    src = root / "layer"
    src.mkdir()
    with open(src / "input.bin", "wb") as f:
        for _ in range(MIB):
            f.write(os.urandom(1 << 20))
    tar, copy, dest = root / "t.tar", root / "copy.bin", root / "dest"

    def plain() -> float:
        t = timed(["cp", "--reflink=never", str(src / "input.bin"), str(copy)])
        copy.unlink()
        return t

    def capture() -> float:
        t = timed_call(lambda: layer.capture_tree(str(src), str(tar), align=CHUNK))
        tar.unlink()
        return t

    def apply() -> float:
        dest.mkdir()
        t = timed_call(lambda: layer.apply_tree(str(tar), str(dest), consume=False))
        shutil.rmtree(dest)
        return t

    out = [ratio_row(f"{fs}: capture into a tar vs cp", *pairs(PAIRS, plain, capture))]
    layer.capture_tree(str(src), str(tar), align=CHUNK)
    out.append(ratio_row(f"{fs}: apply from the tar vs cp", *pairs(PAIRS, plain, apply)))
    return out


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("run as root (after install/setup-host.sh)")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        base = Path(tmp)
        (base / "disk").mkdir()
        findmnt = ["findmnt", "-n", "-o", "FSTYPE", "--target", tmp]
        fstype = subprocess.run(findmnt, capture_output=True, text=True)
        table = rows(base / "disk", fstype.stdout.strip())
        with xfs(base / "xfs", f"{3 * MIB + 400}m") as disk:
            table += rows(disk, "xfs, reflink")
    print(f"A {MIB} MiB file of the writable layer copied by mmshim vs `cp --reflink=never` (2-core VM)\n")
    print(TABLE_HEAD)
    print("\n".join(table))


if __name__ == "__main__":
    main()
