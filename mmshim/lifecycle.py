"""The create/start/delete interception: the one place where mmshim decides to differ from runc.

Each runc call is one process phase, as in containerd's runc shim: `create` reads the bundle once
and decides (plain create, or restore in its place); `start` is a no-op after a restore; `delete`
cleans up. Everything that is not a protected Batch job ends in an exec of runc.
"""

import json
import os

from mmshim.runtime import Invocation, exec_runc

STATE_FILE = "mmshim.json"  # kept in runc's own state dir <root>/<id>/, so `runc delete` removes it


class Bundle:
    """What mmshim needs from an OCI bundle, read once at `create` (no dataclass: hot path)."""

    def __init__(self, path: str, spec: dict) -> None:
        self.path = path
        self.spec = spec

    @classmethod
    def load(cls, path: str) -> "Bundle":
        config = os.path.join(path, "config.json")
        try:
            with open(config, "rb") as f:
                spec = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read bundle config {config}: {exc}") from exc
        if not isinstance(spec, dict):
            raise ValueError(f"bundle config {config} is not a JSON object")
        return cls(path, spec)

    @property
    def env(self) -> dict[str, str]:
        process = self.spec.get("process") or {}
        pairs = (item.partition("=") for item in process.get("env") or [] if isinstance(item, str))
        return {key: value for key, _, value in pairs}

    @property
    def terminal(self) -> bool:
        return bool((self.spec.get("process") or {}).get("terminal"))


def state_path(inv: Invocation) -> str:
    return os.path.join(inv.root, str(inv.container_id), STATE_FILE)


def create(inv: Invocation, runc: str) -> None:
    Bundle.load(inv.bundle)  # an unreadable config.json is reported here, clearly, not by runc
    exec_runc(runc, inv.argv)


def start(inv: Invocation, runc: str) -> None:
    if os.path.exists(state_path(inv)):
        with open(state_path(inv)) as f:
            if json.load(f).get("restored"):
                return  # the process was restored at create and is already running
    exec_runc(runc, inv.argv)


def delete(inv: Invocation, runc: str) -> None:
    exec_runc(runc, inv.argv)


HANDLERS = {"create": create, "start": start, "delete": delete}


def dispatch(inv: Invocation, runc: str) -> None:
    HANDLERS[str(inv.command)](inv, runc)
