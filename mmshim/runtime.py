"""The runc-compatible entry point: parse runc's argv, exec runc for everything not intercepted.

This module runs on every containerd call, under `python3 -IS`. It imports only the few
standard-library modules it needs so that a passthrough costs one interpreter start-up and an
exec; `create`, `start` and `delete` are handed to `mmshim.lifecycle`, imported only then.
Modelled on nvidia-container-runtime: tiny, exec as early as possible.
"""

import os
import sys

INTERCEPTED = frozenset({"create", "start", "delete"})
CONFIG_FILE = "/etc/mmshim/config.toml"

# runc's global flags (urfave/cli): those taking a value, and booleans.
GLOBAL_VALUE_FLAGS = frozenset({"root", "log", "log-format", "criu", "rootless"})
GLOBAL_BOOL_FLAGS = frozenset({"debug", "systemd-cgroup"})

# Flags of the intercepted subcommands, to find their positional container id.
# Short aliases are mapped to their long names.
SUBCOMMAND_FLAGS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "create": (
        frozenset({"bundle", "console-socket", "pid-file", "preserve-fds"}),
        frozenset({"no-pivot", "no-new-keyring"}),
    ),
    "start": (frozenset(), frozenset()),
    "delete": (frozenset(), frozenset({"force"})),
}
ALIASES = {"b": "bundle", "f": "force"}


class UsageError(Exception):
    """argv that mmshim cannot interpret; runc is left to report it."""


class Invocation:
    """One runc command line, split into the parts mmshim acts on.

    A plain class: importing dataclasses costs more than the rest of the hot path together.
    """

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv  # everything after the program name, untouched
        self.global_flags: dict[str, str | bool] = {}
        self.command: str | None = None
        self.command_args: list[str] = []  # argv after the subcommand
        self.flags: dict[str, str | bool] = {}  # the subcommand's own flags
        self.container_id: str | None = None

    @property
    def global_argv(self) -> list[str]:
        """The global part of argv, to put in front of another runc subcommand."""
        return self.argv[: len(self.argv) - len(self.command_args) - (1 if self.command else 0)]

    @property
    def root(self) -> str:
        return str(self.global_flags.get("root") or "/run/runc")

    @property
    def bundle(self) -> str:
        """The bundle directory; runc's default is the current directory."""
        return os.path.abspath(str(self.flags.get("bundle") or "."))

    @property
    def pid_file(self) -> str | None:
        value = self.flags.get("pid-file")
        return os.path.abspath(str(value)) if value else None

    @property
    def console_socket(self) -> str | None:
        value = self.flags.get("console-socket")
        return str(value) if value else None


def _split_flag(arg: str) -> tuple[str, str | None]:
    """`--name=value`, `-name=value`, `--name` or `-n` → (name, inline value or None)."""
    name = arg.lstrip("-")
    if "=" in name:
        name, value = name.split("=", 1)
        return ALIASES.get(name, name), value
    return ALIASES.get(name, name), None


def _parse_flags(
    args: list[str], value_flags: frozenset[str], bool_flags: frozenset[str], stop_at_positional: bool
) -> tuple[dict[str, str | bool], int, list[str]]:
    """Parse urfave/cli-style flags; return (flags, index where parsing stopped, positionals)."""
    flags: dict[str, str | bool] = {}
    positionals: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            positionals.extend(args[i + 1 :])
            return flags, len(args), positionals
        if arg.startswith("-") and arg != "-":
            name, inline = _split_flag(arg)
            if name in value_flags:
                if inline is None:
                    if i + 1 >= len(args):
                        raise UsageError(f"flag needs an argument: {arg}")
                    i += 1
                    inline = args[i]
                flags[name] = inline
            elif name in bool_flags:
                flags[name] = inline is None or inline.lower() in ("1", "t", "true")
            else:
                raise UsageError(f"flag provided but not defined: {arg}")
        elif stop_at_positional:
            return flags, i, positionals
        else:
            positionals.append(arg)
        i += 1
    return flags, i, positionals


def parse(argv: list[str]) -> Invocation:
    """Split runc's command line. Raises UsageError for what only runc should judge."""
    inv = Invocation(list(argv))
    try:
        inv.global_flags, pos, _ = _parse_flags(argv, GLOBAL_VALUE_FLAGS, GLOBAL_BOOL_FLAGS, True)
    except UsageError:
        # --help, --version or a flag of a newer runc: only runc knows; never intercept.
        return inv
    if pos >= len(argv):
        return inv
    inv.command = argv[pos]
    inv.command_args = argv[pos + 1 :]
    if inv.command in SUBCOMMAND_FLAGS:
        value_flags, bool_flags = SUBCOMMAND_FLAGS[inv.command]
        inv.flags, _, positionals = _parse_flags(inv.command_args, value_flags, bool_flags, False)
        if len(positionals) != 1:
            raise UsageError(f"{inv.command} takes exactly one container id, got {len(positionals)}")
        inv.container_id = positionals[0]
    return inv


class RuncNotFound(Exception):
    pass


def _is_self(path: str) -> bool:
    """Is this mmshim: the Python runtime itself, or the launcher that started it?"""
    for me in (sys.argv[0], os.environ.get("MMSHIM_SELF")):
        try:
            if me and os.path.samefile(path, me):
                return True
        except OSError:
            pass
    return False


def _runc_from_config() -> str | None:
    try:
        with open(CONFIG_FILE, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    import tomllib  # only when a config file exists

    value = tomllib.loads(data.decode()).get("runc")
    return str(value) if value else None


def find_runc() -> str:
    """The real runc: $MMSHIM_RUNC, then /etc/mmshim/config.toml `runc`, then PATH minus ourselves."""
    explicit = os.environ.get("MMSHIM_RUNC") or _runc_from_config()
    if explicit:
        if os.access(explicit, os.X_OK) and not os.path.isdir(explicit):
            if _is_self(explicit):
                raise RuncNotFound(f"configured runc {explicit} is mmshim itself")
            return explicit
        raise RuncNotFound(f"configured runc {explicit} is not an executable file")
    for directory in os.environ.get(
        "PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    ).split(os.pathsep):
        candidate = os.path.join(directory or ".", "runc")
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate) and not _is_self(candidate):
            return candidate
    raise RuncNotFound("no runc found on PATH (set MMSHIM_RUNC or `runc` in /etc/mmshim/config.toml)")


def report_error(inv: Invocation, message: str) -> None:
    """Write one error the way runc does, so containerd shows it to `docker run`."""
    message = f"mmshim: {message}"
    sys.stderr.write(message + "\n")
    log_path = inv.global_flags.get("log")
    if not isinstance(log_path, str) or not log_path:
        return
    if inv.global_flags.get("log-format") == "json":
        import json
        import time

        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        line = json.dumps({"level": "error", "msg": message, "time": stamp})
    else:
        line = f'level=error msg="{message}"'
    try:
        with open(log_path, "a") as f:
            f.write(line + "\n")
    except OSError:
        pass


def exec_runc(runc: str, argv: list[str]) -> None:
    """Become runc: same pid, fds, signals and exit status."""
    os.execv(runc, [runc, *argv])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        inv = parse(argv)
    except UsageError:
        inv = None
    if inv is None or inv.command not in INTERCEPTED:
        if inv is not None and inv.command is None and inv.argv[-1:] in (["--version"], ["-v"]):
            from mmshim import __version__

            sys.stdout.write(f"mmshim version {__version__}\n")
            sys.stdout.flush()
        try:
            exec_runc(find_runc(), argv)
        except (RuncNotFound, OSError) as exc:
            report_error(inv or Invocation(argv), str(exc))
            sys.exit(1)
        return
    try:
        runc = find_runc()
        from mmshim import lifecycle

        lifecycle.dispatch(inv, runc)
    except (RuncNotFound, OSError, ValueError) as exc:
        report_error(inv, str(exc))
        sys.exit(1)
