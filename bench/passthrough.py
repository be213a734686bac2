"""What mmshim costs when it only passes through: docker run lifecycle, one runc call, imports.

Prints a table of ratios against raw runc measured in the same run (a noisy 2-core VM: compare the
ratios, not the absolute times). Needs root; starts its own private dockerd.
"""

import os
import shutil
import subprocess
from pathlib import Path

from common import TABLE_HEAD, bench_host, pairs, ratio_row, timed

from mmshim.localdocker import DOCKER, IMAGE, MMSHIM

PAIRS = int(os.environ.get("BENCH_PAIRS", "25"))
RUNC = shutil.which("runc") or "/usr/sbin/runc"


def main() -> None:
    with bench_host("passthrough") as (d, _):
        run = [DOCKER, "-H", d.host, "run", "--rm", "--network", "none"]
        rows = [
            ratio_row(
                "`docker run --rm IMAGE true` (4 runtime calls)",
                *pairs(
                    PAIRS,
                    lambda: timed([*run, "--runtime=runc", IMAGE, "true"]),
                    lambda: timed([*run, "--runtime=mmshim", IMAGE, "true"]),
                ),
            )
        ]
        cid = d.out("run", "-d", "--network", "none", "--runtime=mmshim", IMAGE, "sleep", "600").strip()
        root = d.runc_root
        rows.append(
            ratio_row(
                "`state ID` (one runtime call)",
                *pairs(
                    PAIRS * 4,
                    lambda: timed([RUNC, "--root", root, "state", cid]),
                    lambda: timed([MMSHIM, "--root", root, "state", cid]),
                ),
            )
        )
    print(TABLE_HEAD)
    print("\n".join(rows))
    print("\nThe Python runtime, when the launcher hands a call to it (`python3 -IS -X importtime`):")
    runtime = Path(Path(MMSHIM).read_text().split("exec '", 1)[1].split("'", 1)[0])
    proc = subprocess.run(
        [str(runtime.parent / "python3"), "-IS", "-X", "importtime", str(runtime), "state", "x"],
        env={**os.environ, "MMSHIM_RUNC": "/bin/true"},
        capture_output=True,
        text=True,
    )
    print("\n".join(ln for ln in proc.stderr.splitlines() if ln.startswith("import time:")))


if __name__ == "__main__":
    main()
