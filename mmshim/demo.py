"""The README's main job: a container run through mmshim on a private dockerd, on this one machine."""

import shutil
import sys
import tempfile
from pathlib import Path

from mmshim.localdocker import IMAGE, Docker, build_image, start_dockerd, stop_dockerd


def main() -> int:
    if not shutil.which("dockerd"):
        print("dockerd is missing: run `make demo` (it runs install/setup-host.sh first)", file=sys.stderr)
        return 1
    state = Path(tempfile.mkdtemp(prefix="mmdemo-", dir="/tmp"))
    try:
        print(f"starting a private dockerd under {state} with the mmshim runtime registered")
        d = Docker(start_dockerd(state))
        build_image(d, state)
        script = "echo hello from a container started by mmshim; cat /proc/1/cmdline | tr '\\0' ' '; echo"
        proc = d.run("run", "--rm", "--network", "none", "--runtime=mmshim", IMAGE, "sh", "-c", script)
        print(proc.stdout, end="")
        return 0
    finally:
        stop_dockerd(state)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
