#!/usr/bin/env python3
"""Register mmshim with dockerd or containerd, and take it out again.

    register-runtime.py docker [--default] [--remove] [--config F] [--pidfile F] [--path P]
    register-runtime.py containerd [--remove] [--config F] [--path P]

Docker: merges `runtimes.mmshim` (and with --default `"default-runtime": "mmshim"`, which ECS needs,
since its agent cannot choose a runtime per task) into daemon.json, keeping every other key, then
SIGHUPs dockerd so it reloads. Containerd: adds a runc.v2 runtime whose BinaryName is mmshim, as a
marked block, to config.toml (restart containerd to apply). Each change is validated before it
replaces the file and leaves a timestamped backup; --remove undoes it, restoring the previous
default runtime. Standard library only: this runs in launch-template user data.
"""

import argparse
import json
import os
import shutil
import signal
import sys
import time
import tomllib
from pathlib import Path

NAME = "mmshim"
PREVIOUS_KEY = "mmshim-previous-default-runtime"  # kept in daemon.json so --remove can restore it
BEGIN, END = "# BEGIN mmshim runtime (install/register-runtime.py)", "# END mmshim runtime"


class RegisterError(Exception):
    pass


def write_atomically(path: Path, text: str) -> None:
    """Back up the current file, then replace it whole: a crash never leaves half a config."""
    if path.exists():
        backup = path.with_name(f"{path.name}.bak-{time.strftime('%Y%m%dT%H%M%S')}")
        shutil.copy2(path, backup)
        print(f"backup: {backup}", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".mmshim-tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def docker_config(current: dict, runtime_path: str, default: bool, remove: bool) -> dict:
    config = dict(current)
    runtimes = dict(config.get("runtimes") or {})
    if remove:
        runtimes.pop(NAME, None)
        if config.get("default-runtime") == NAME:
            previous = config.pop(PREVIOUS_KEY, None)
            if previous:
                config["default-runtime"] = previous
            else:
                config.pop("default-runtime")
        config.pop(PREVIOUS_KEY, None)
    else:
        runtimes[NAME] = {"path": runtime_path}
        if default and config.get("default-runtime") != NAME:
            if config.get("default-runtime"):
                config[PREVIOUS_KEY] = config["default-runtime"]
            config["default-runtime"] = NAME
    if runtimes:
        config["runtimes"] = runtimes
    else:
        config.pop("runtimes", None)
    return config


def register_docker(args: argparse.Namespace) -> None:
    path = Path(args.config)
    try:
        current = json.loads(path.read_text()) if path.exists() and path.read_text().strip() else {}
    except json.JSONDecodeError as exc:
        raise RegisterError(f"{path} is not valid JSON ({exc}); fix it first, nothing was changed") from exc
    if not isinstance(current, dict):
        raise RegisterError(f"{path} is not a JSON object; nothing was changed")
    if not args.remove and not os.access(args.path, os.X_OK):
        raise RegisterError(f"{args.path} is not executable: install mmshim first")
    config = docker_config(current, args.path, args.default, args.remove)
    if config == current:
        print(f"{path}: already as asked", file=sys.stderr)
        return
    text = json.dumps(config, indent=2) + "\n"
    json.loads(text)
    write_atomically(path, text)
    reload_dockerd(Path(args.pidfile))


def reload_dockerd(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGHUP)
        print(f"dockerd (pid {pid}) reloaded", file=sys.stderr)
    except (OSError, ValueError):
        print(f"dockerd not running ({pidfile}): the change applies when it starts", file=sys.stderr)


def containerd_block(runtime_path: str) -> str:
    table = f'plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{NAME}'
    return (
        f'{BEGIN}\n[{table}]\n  runtime_type = "io.containerd.runc.v2"\n'
        f'[{table}.options]\n  BinaryName = "{runtime_path}"\n{END}\n'
    )


def register_containerd(args: argparse.Namespace) -> None:
    path = Path(args.config)
    current = path.read_text() if path.exists() else ""
    if BEGIN in current:
        head, _, rest = current.partition(BEGIN)
        current = head.rstrip("\n") + ("\n" if head.strip() else "") + rest.partition(END)[2].lstrip("\n")
    text = current if args.remove else current + ("\n" if current and not current.endswith("\n") else "")
    if not args.remove:
        text += containerd_block(args.path)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegisterError(f"{path} would not be valid TOML ({exc}); nothing was changed") from exc
    if text == (path.read_text() if path.exists() else ""):
        print(f"{path}: already as asked", file=sys.stderr)
        return
    write_atomically(path, text)
    print("restart containerd to apply", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("engine", choices=["docker", "containerd"])
    parser.add_argument("--remove", action="store_true", help="take mmshim out again")
    parser.add_argument("--default", action="store_true", help="docker: make mmshim the default runtime")
    parser.add_argument("--config", help="daemon.json / config.toml to edit")
    parser.add_argument("--pidfile", default="/var/run/docker.pid", help="docker: dockerd's pid file")
    parser.add_argument("--path", default="/usr/local/bin/mmshim", help="the mmshim executable")
    args = parser.parse_args(argv)
    if args.config is None:
        args.config = "/etc/docker/daemon.json" if args.engine == "docker" else "/etc/containerd/config.toml"
    try:
        (register_docker if args.engine == "docker" else register_containerd)(args)
    except (RegisterError, OSError) as exc:
        print(f"register-runtime: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
