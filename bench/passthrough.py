"""What mmshim costs when it only passes through: docker run lifecycle, one runc call, imports.

Prints a table of ratios against raw runc measured in the same run (a noisy 2-core VM: compare the
ratios, not the absolute times). Needs root; starts its own private dockerd.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mmshim.localdocker import IMAGE, MMSHIM, Docker, build_image, start_dockerd, stop_dockerd

PAIRS = int(os.environ.get("BENCH_PAIRS", "25"))
RUNC = shutil.which("runc") or "/usr/sbin/runc"


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def ratio_row(name: str, base: list[float], ours: list[float]) -> str:
    ratios = sorted(o / b for o, b in zip(ours, base, strict=True))
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return (
        f"| {name} | {statistics.median(base) * 1000:.1f} ms | {statistics.median(ours) * 1000:.1f} ms "
        f"| {statistics.median(ratios):.3f} | {q1:.3f} to {q3:.3f} | {len(ratios)} |"
    )


def bench_docker_run(d: Docker) -> str:
    base, ours = [], []
    for i in range(PAIRS + 2):
        pair = []
        for rt in ("runc", "mmshim") if i % 2 == 0 else ("mmshim", "runc"):
            argv = [
                "docker",
                "-H",
                d.host,
                "run",
                "--rm",
                "--network",
                "none",
                f"--runtime={rt}",
                IMAGE,
                "true",
            ]
            pair.append((rt, timed(argv)))
        if i < 2:
            continue  # warm-up
        times = dict(pair)
        base.append(times["runc"])
        ours.append(times["mmshim"])
    return ratio_row("`docker run --rm IMAGE true`", base, ours)


def bench_state(d: Docker) -> str:
    cid = d.out("run", "-d", "--network", "none", "--runtime=mmshim", IMAGE, "sleep", "600").strip()
    # dockerd 20.10 gives every runtime the runc state root under its exec-root.
    root = str(Path(d.host.removeprefix("unix://")).parent / "exec" / "runtime-runc" / "moby")
    base, ours = [], []
    try:
        for i in range(PAIRS * 4):
            a = timed([RUNC, "--root", root, "state", cid])
            b = timed([MMSHIM, "--root", root, "state", cid])
            if i >= 4:
                base.append(a)
                ours.append(b)
    finally:
        d.run("rm", "-f", cid, check=False)
    return ratio_row("`state ID` (one runtime call)", base, ours)


def importtime() -> str:
    env = {**os.environ, "MMSHIM_RUNC": "/bin/true"}
    with open(MMSHIM) as f:
        python = f.readline()[2:].split()[0]
    proc = subprocess.run(
        [python, "-IS", "-X", "importtime", MMSHIM, "state", "x"], env=env, capture_output=True, text=True
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("import time:")]
    return "\n".join(lines)


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root")
    state = Path(tempfile.mkdtemp(prefix="mmb-", dir="/tmp"))
    try:
        d = Docker(start_dockerd(state))
        with tempfile.TemporaryDirectory() as tmp:
            build_image(d, Path(tmp))
        rows = [bench_docker_run(d), bench_state(d)]
    finally:
        stop_dockerd(state)
        shutil.rmtree(state, ignore_errors=True)
    print("| what | runc (median) | mmshim (median) | ratio (median of pairs) | ratio IQR | pairs |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nImports of a passthrough call (`python3 -IS -X importtime mmshim state x`):")
    print(importtime())


if __name__ == "__main__":
    main()
