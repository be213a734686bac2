"""What the benchmarks share: a private dockerd with mmshim on a file:// store, ratio statistics."""

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmshim.localdocker import Docker, build_image, start_dockerd, stop_dockerd
from tests.services import FAKE_AWS

MEMHOG = Path(__file__).resolve().parent.parent / "tests" / "workloads" / "memhog.c"


@contextlib.contextmanager
def bench_host(name: str, image: str | None = None) -> Iterator[tuple[Docker, Path]]:
    """A private dockerd whose mmshim keeps checkpoints in <state>/store; image `image` gets memhog."""
    if os.geteuid() != 0:
        sys.exit("run as root (after install/setup-host.sh)")
    os.environ.update(FAKE_AWS)
    state = Path(tempfile.mkdtemp(prefix=f"mmb-{name}-", dir="/var/tmp"))
    config = state / "mmshim.toml"
    config.write_text(
        f'store = "file://{state / "store"}"\nworkdir = "{state / "work"}"\nlog_dir = "{state / "log"}"\n'
        f'imds_endpoint = "http://127.0.0.1:9"\ndocker_host = "unix://{state / "docker" / "docker.sock"}"\n'
    )
    try:
        d = Docker(start_dockerd(state / "docker", {"MMSHIM_CONFIG": str(config), **FAKE_AWS}))
        build_image(d, state)
        if image:
            memhog = state / "memhog"
            subprocess.run(["gcc", "-O2", "-static", "-o", str(memhog), str(MEMHOG)], check=True)
            build_image(d, state, image, {"/bin/memhog": memhog})
        yield d, state
    finally:
        stop_dockerd(state / "docker")
        shutil.rmtree(state, ignore_errors=True)


def timed_call(call: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def timed(argv: list[str]) -> float:
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    return timed_call(lambda: subprocess.run(argv, check=True, **quiet))


def pairs(n: int, base, ours, warmup: int = 2) -> tuple[list[float], list[float]]:
    """Alternate baseline and ours (order flipped every pair) so drift hits both alike."""
    b, o = [], []
    for i in range(n + warmup):
        first, second = (base, ours) if i % 2 == 0 else (ours, base)
        t1, t2 = first(), second()
        tb, to = (t1, t2) if i % 2 == 0 else (t2, t1)
        if i >= warmup:
            b.append(tb)
            o.append(to)
    return b, o


def ratio_row(name: str, base: list[float], ours: list[float]) -> str:
    ratios = sorted(x / y for x, y in zip(ours, base, strict=True))
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return (
        f"| {name} | {statistics.median(base) * 1000:.1f} ms | {statistics.median(ours) * 1000:.1f} ms "
        f"| {statistics.median(ratios):.3f} | {q1:.3f} to {q3:.3f} | {len(ratios)} |"
    )


TABLE_HEAD = (
    "| what | baseline (median) | mmshim (median) | ratio (median of pairs) | ratio IQR | pairs |\n"
    "|---|---|---|---|---|---|"
)
