"""`warmpod run`, `status`, `cancel`, `logs`, `runs`, `environments`: the client on a terminal."""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx
import msgspec

from warmpod.client import Client, FileArg, ProblemError, project_files
from warmpod.client.ignore import IGNORE_FILE
from warmpod.client.wire import DEFAULT_ENTRYPOINT, DEFAULT_URL
from warmpod.models import EnvironmentInfo, OutputEvent, RunResult, StatusEvent
from warmpod.sandbox.files import OUT_DIR, path_problem

EXIT_TIMEOUT = 124
"""The wall time or the CPU time ran out (as timeout(1) says it)."""
EXIT_WARMPOD = 125
"""warmpod could not run the program: unreachable, refused, an ``error`` or ``cancelled`` run."""
EXIT_MEMORY = 137
"""The memory limit killed the program (128 + SIGKILL)."""
COMMANDS = ("run", "status", "cancel", "logs", "runs", "environments")
# What a program's output may not send to the user's terminal as it is: C0 controls but newline
# and tab (escape sequences start with ESC; a carriage return or backspace overwrites what came
# before), DEL, the C1 controls (U+009B is a one-character CSI), and the bidirectional overrides
# and isolates that make a line read otherwise than it is.
_UNSAFE = [
    *range(0x00, 0x09),
    *range(0x0B, 0x20),
    *range(0x7F, 0xA0),
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
]
_VISIBLE = str.maketrans({c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _UNSAFE})


def add_commands(commands: Any) -> None:
    """Add this module's commands to the ``warmpod`` parser's subcommands."""
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument(
        "--server", metavar="URL", help=f"the warmpod server (WARMPOD_URL, else {DEFAULT_URL})"
    )
    server.add_argument("--api-key", metavar="KEY", help="sent as a bearer token (WARMPOD_API_KEY)")
    run = commands.add_parser(
        "run",
        parents=[server],
        help="run a Python file or project on a warmpod server, its output live on this terminal",
        description="Exit status: the program's own; 124 for a wall or CPU timeout, 137 for a memory "
        "kill, 128+N for signal N, 125 when warmpod could not run it.",
    )
    run.add_argument(
        "script",
        help="the Python file to run (- reads it from standard input), or a project directory: its "
        "files are sent (not symlinks, nor what its .warmpodignore leaves out) and --entrypoint runs",
    )
    run.add_argument(
        "--entrypoint",
        metavar="PATH",
        help="the path the program runs as in the sandbox's working directory, where a project "
        f"directory's files keep their paths under it (default: {DEFAULT_ENTRYPOINT})",
    )
    run.add_argument(
        "--arg",
        action="append",
        default=[],
        dest="args",
        metavar="VALUE",
        help="an argument for the program, in order (repeatable; --arg=-x for one starting with -)",
    )
    run.add_argument(
        "--env",
        action="append",
        default=[],
        type=_env_pair,
        metavar="NAME=VALUE",
        help="an environment variable for the program (repeatable)",
    )
    run.add_argument(
        "--secret",
        action="append",
        default=[],
        dest="secrets",
        metavar="NAME",
        help="one of the server's secrets, given to the program as a variable of its name (repeatable)",
    )
    run.add_argument(
        "--source",
        action="append",
        default=[],
        dest="sources",
        metavar="NAME",
        help="one of the server's data sources the program may connect to, through its relay (repeatable)",
    )
    run.add_argument(
        # --env is its prefix, but argparse takes an exact option over an abbreviation: --env stays
        # the variable's.
        "--environment",
        "--env-name",
        dest="environment",
        metavar="NAME",
        help="the library set to run with, one of `warmpod environments` (default: default)",
    )
    run.add_argument(
        "--label",
        action="append",
        default=[],
        dest="labels",
        type=_env_pair,
        metavar="NAME=VALUE",
        help="a label kept with the run, to find it by in `warmpod runs` (repeatable)",
    )
    run.add_argument("--stdin", metavar="FILE", help="what the program reads on standard input (- for ours)")
    run.add_argument("--timeout", type=float, metavar="S", help="wall-time limit in seconds")
    run.add_argument("--cpu-time", type=int, metavar="S", help="CPU-time limit in seconds")
    run.add_argument("--memory-mb", type=int, metavar="N", help="memory limit in MiB")
    run.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="PATH[:DEST]",
        help="a data file for the program, at DEST under its working directory (default: its name)",
    )
    run.add_argument("--out", default=OUT_DIR, metavar="DIR", help="where the files it leaves in out/ go")
    run.add_argument("--no-wait", action="store_true", help="queue the run and print its id")
    run.add_argument("--json", action="store_true", help="print the whole result as JSON, not the output")
    for name, text in (
        ("status", "print a run's result as JSON"),
        ("cancel", "stop a queued or running run"),
    ):
        command = commands.add_parser(name, parents=[server], help=text)
        command.add_argument("id", help="the run's id")
    logs = commands.add_parser("logs", parents=[server], help="print a run's output so far")
    logs.add_argument("id", help="the run's id")
    logs.add_argument("--follow", "-f", action="store_true", help="then follow it until the run ends")
    history = commands.add_parser(
        "runs",
        parents=[server],
        help="list this key's runs, newest first (id, status, environment, created, labels)",
    )
    history.add_argument(
        "--status",
        action="append",
        default=[],
        metavar="STATUS",
        help="only runs in this status (repeatable)",
    )
    history.add_argument(
        "--label",
        action="append",
        default=[],
        dest="labels",
        metavar="NAME=VALUE",
        help="only runs with this label (repeatable: all of them)",
    )
    history.add_argument("--environment", metavar="NAME", help="only runs of this environment")
    history.add_argument("--since", metavar="TIME", help="only runs created since (unix seconds or RFC 3339)")
    history.add_argument(
        "--until", metavar="TIME", help="only runs created before (unix seconds or RFC 3339)"
    )
    history.add_argument(
        "--limit", type=int, default=50, metavar="N", help="print at most N runs (default 50)"
    )
    history.add_argument("--json", action="store_true", help="print them as JSON, one list")
    listing = commands.add_parser(
        "environments", parents=[server], help="list the environments a run may name (those the key may use)"
    )
    listing.add_argument("--json", action="store_true", help="print them as JSON, every package named")


def main(args: argparse.Namespace) -> int:
    """Run one of this module's commands; warmpod's own failures exit 125 with the reason on stderr."""
    try:
        with Client(args.server, api_key=args.api_key) as client:
            if args.command == "run":
                return _run(client, args)
            if args.command == "logs":
                return _logs(client, args.id, args.follow)
            if args.command == "runs":
                return _runs(client, args)
            if args.command == "environments":
                return _environments(client.environments(), as_json=args.json)
            result = client.status(args.id) if args.command == "status" else client.cancel(args.id)
            _print_json(result)
            return 0
    except (ProblemError, httpx.HTTPError, OSError, ValueError) as exc:
        print(f"warmpod: {exc or type(exc).__name__}", file=sys.stderr)
        return EXIT_WARMPOD


def exit_status(result: RunResult) -> int:
    """The exit status ``warmpod run`` gives for ``result``."""
    if result.status in ("error", "cancelled", "queued", "running") or result.exit_code is None:
        return EXIT_WARMPOD
    if "memory" in result.limits_hit:
        return EXIT_MEMORY
    if result.status == "timeout" or "cpu_time" in result.limits_hit or "wall_time" in result.limits_hit:
        return EXIT_TIMEOUT
    return 128 - result.exit_code if result.exit_code < 0 else result.exit_code


def _run(client: Client, args: argparse.Namespace) -> int:
    if args.script == "-" and args.stdin == "-":
        raise ValueError("the script and --stdin cannot both be read from standard input")
    code, files = _program(args.script, args.entrypoint)
    stdin = None
    if args.stdin is not None:
        stdin = sys.stdin.buffer.read() if args.stdin == "-" else Path(args.stdin).read_bytes()
    accepted = client.submit(
        code,
        stdin=stdin,
        files=[*files, *(_file_arg(spec) for spec in args.file)],
        entrypoint=args.entrypoint,
        args=args.args,
        env=_env(args.env),
        secrets=args.secrets,
        sources=args.sources,
        environment=args.environment,
        timeout=args.timeout,
        cpu_time=args.cpu_time,
        memory_mb=args.memory_mb,
        labels=_labels(args.labels),
    )
    if args.no_wait:
        if args.json:
            _print_json(accepted)
        else:
            print(accepted.id)
        return 0
    try:
        result = _follow(client, accepted.id, show=not args.json)
    except KeyboardInterrupt:
        with contextlib.suppress(ProblemError, httpx.HTTPError):
            client.cancel(accepted.id)
        print(f"\nwarmpod: interrupted: run {accepted.id} cancelled", file=sys.stderr)
        return 130
    saved = _save_files(client, result, Path(args.out))
    if args.json:
        _print_json(result)
    else:
        _say_how_it_ended(result, saved, args.out)
    return exit_status(result)


def _logs(client: Client, run_id: str, follow: bool) -> int:
    if follow:
        return exit_status(_follow(client, run_id, show=True))
    result = client.status(run_id)
    _write(sys.stdout, result.stdout)
    _write(sys.stderr, result.stderr)
    return 0


def _labels(pairs: list[tuple[str, str]]) -> dict[str, str]:
    labels = dict(pairs)
    if len(labels) < len(pairs):
        raise ValueError("--label gives a name twice")
    return labels


def _runs(client: Client, args: argparse.Namespace) -> int:
    """Print the key's runs as a table (id, status, environment, created, labels), or as JSON."""
    if args.limit < 1:
        raise ValueError("--limit must be at least 1")
    found = client.runs(
        status=args.status,
        label=args.labels,
        environment=args.environment,
        since=args.since,
        until=args.until,
        page_size=min(args.limit, 500),
    )
    listed = list(itertools.islice(found, args.limit))
    if args.json:
        _print_json(listed)
        return 0
    _table(
        [("ID", "STATUS", "ENVIRONMENT", "CREATED", "LABELS")]
        + [
            (
                run.id,
                run.status,
                run.environment,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.created)),
                ",".join(f"{name}={value}" for name, value in sorted(run.labels.items())) or "-",
            )
            for run in listed
        ]
    )
    return 0


def _table(rows: Iterable[tuple[str, ...]]) -> None:
    """Print ``rows`` in aligned columns, every cell's control characters shown, not obeyed."""
    rows = list(rows)
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        # What a server says is shown, not obeyed, as a program's output is.
        print(visible("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()))


def _environments(environments: list[EnvironmentInfo], *, as_json: bool) -> int:
    """Print the environments as a table (name, Python, how many packages, preload, min_warm)."""
    if as_json:
        _print_json(environments)
        return 0
    _table(
        [("NAME", "PYTHON", "PACKAGES", "PRELOAD", "MIN_WARM")]
        + [
            (
                info.name,
                info.python or "-",
                str(len(info.packages)),
                ",".join(info.preload) or "-",
                str(info.min_warm),
            )
            for info in environments
        ]
    )
    return 0


def _follow(client: Client, run_id: str, *, show: bool) -> RunResult:
    """Follow the run's stream to its result, its output going live to our stdout and stderr."""
    with (
        _spinner(show and sys.stderr.isatty(), run_id) as waiting,
        contextlib.closing(client.stream(run_id)) as events,
    ):
        for event in events:
            if isinstance(event, StatusEvent):
                waiting(event.status == "queued")
            elif isinstance(event, OutputEvent):
                waiting(False)
                if show:
                    _write(sys.stdout if event.stream == "stdout" else sys.stderr, event.text)
            elif isinstance(event, RunResult):
                return event
    raise ProblemError(502, "Stream ended", "the run's stream ended without its result")


@contextlib.contextmanager
def _spinner(enabled: bool, run_id: str) -> Iterator[Any]:
    """A ``waiting(bool)`` switch for a spinner on stderr while the run is queued (a terminal only)."""
    if not enabled:
        yield lambda on: None
        return
    on = threading.Event()
    done = threading.Event()

    def spin() -> None:
        frames = "|/-\\"
        shown = False
        tick = 0
        while not done.wait(0.1):
            if on.is_set():
                sys.stderr.write(f"\r{frames[tick % 4]} queued (run {run_id[:8]})")
                sys.stderr.flush()
                shown, tick = True, tick + 1
            elif shown:
                sys.stderr.write("\r\033[K")
                sys.stderr.flush()
                shown = False
        if shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def waiting(queued: bool) -> None:
        if queued:
            on.set()
        elif on.is_set():
            on.clear()
            done.wait(0.15)  # let the spinner wipe its line before output follows it

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield waiting
    finally:
        done.set()
        thread.join()


def _program(script: str, entrypoint: str | None) -> tuple[str | None, list[tuple[str, bytes]]]:
    """The code and files of ``warmpod run SCRIPT``: a file's text, or a project directory's files."""
    if script == "-":
        return sys.stdin.read(), []
    if not Path(script).is_dir():
        return Path(script).read_text(encoding="utf-8"), []
    files = project_files(script)
    runs = entrypoint or DEFAULT_ENTRYPOINT
    if runs not in {path for path, _ in files}:
        raise ValueError(
            f"{runs} is not among the files of {script} (missing, or left out by its {IGNORE_FILE}): "
            "name the program with --entrypoint PATH, relative to the directory"
        )
    return None, files


def _env_pair(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, not {text!r}")
    return name, value


def _env(pairs: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for name, value in pairs:
        if name in env:
            raise ValueError(f"--env gives {name} twice")
        env[name] = value
    return env


def _file_arg(spec: str) -> FileArg:
    """``PATH`` (sent under its name) or ``PATH:DEST``; a PATH that exists as given wins over a split."""
    if os.path.exists(spec) or ":" not in spec:
        return spec
    local, _, dest = spec.partition(":")
    return (dest, Path(local).read_bytes())


def _save_files(client: Client, result: RunResult, directory: Path) -> list[Path]:
    """Write the files the run left in out/ under ``directory``; a path that is not plainly under
    out/ is refused (what a server relays from a sandbox is not trusted here either)."""
    saved = []
    for entry in result.files:
        relative = entry.path.removeprefix(OUT_DIR + "/")
        if path_problem(entry.path) is not None or relative == entry.path:
            print(f"warmpod: not saving {entry.path!r}: not a plain path under out/", file=sys.stderr)
            continue
        data = base64.b64decode(entry.content) if entry.content is not None else None
        if data is None:
            data = client.file(result.id, entry.path)
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        saved.append(target)
    return saved


def _say_how_it_ended(result: RunResult, saved: list[Path], out: str) -> None:
    if saved:
        print(f"warmpod: {len(saved)} file(s) saved in {out}/", file=sys.stderr)
    if result.files_truncated:
        print("warmpod: some files were left out (the server's file caps)", file=sys.stderr)
    for stream in ("stdout", "stderr"):
        if getattr(result, f"{stream}_truncated"):
            print(f"warmpod: {stream} was cut at the output limit", file=sys.stderr)
    if result.status == "succeeded":
        return
    how: str = result.status
    if result.limits_hit:
        how += f" ({', '.join(result.limits_hit)})"
    if result.error:
        how += f": {result.error}"
    print(f"warmpod: run {result.id} ended {how}", file=sys.stderr)


def visible(text: str) -> str:
    """``text`` with every character that could drive a terminal shown as an escape (``\\x1b``)."""
    return text.translate(_VISIBLE)


def _write(stream: TextIO, text: str) -> None:
    # A program's output is untrusted: on a terminal its control characters are shown, not
    # obeyed; piped or redirected, it is passed on byte for byte.
    if stream.isatty():
        text = visible(text)
    # As bytes: the program's UTF-8 passes through whatever this terminal's locale says.
    stream.flush()
    stream.buffer.write(text.encode("utf-8", "replace"))
    stream.buffer.flush()


def _print_json(value: object) -> None:
    print(msgspec.json.format(msgspec.json.encode(value).decode(), indent=2))
