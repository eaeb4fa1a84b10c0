"""The program's side of a pool container: pool/agent.py's forked child runs ``boot()`` from bootstrap.pyc.

It first imports the preload modules named in ``sys.argv[1:]`` (the program's own process pays for
them, before the container is paused), reports readiness and any module that failed on fd 4, then
waits for the job on fd 3, writes its files and entrypoint (main.py unless named) into its working
directory and runs it as __main__ the way ``python3 ENTRYPOINT ARGS`` would from there: a fresh
module, __file__ set, sys.argv the entrypoint and the args, sys.path the entrypoint's directory and
then the project's root, tracebacks without this bootstrap's frame. It ends the way Py_Finalize
does up to module teardown: threads joined, atexit handlers run, the program's globals released,
stdout and stderr flushed, then ``os._exit``: it must never return into the agent's code it was
forked from. Tearing pandas down would cost about 50 ms more, and nothing of the process outlives it.

Runs as the program's user, after the agent dropped its privileges; stdlib only. The image build
compiles it to bootstrap.pyc (the root is read-only: no interpreter could cache its bytecode).
"""

import builtins
import gc
import os
import sys

# Annotations name it for mypy only: importing typing would cost every run's start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn


# Where the program leaves the files that come back with its result (the agent's OUT_DIR).
OUT_DIR = "out"
# What the thread is named at the end, with the exit code (the agent's EXIT_NAME).
EXIT_NAME = "warmpod-exit"


def boot(restrict_connects: "Callable[[list[int]], None]") -> "NoReturn":  # noqa: C901  # one ordered sequence in the program's own process, its names deleted before the program runs
    """Preload, report ready, take the job, run the program as ``__main__``, end like Py_Finalize.

    ``restrict_connects(ports)`` is the agent's: it lets this process connect by TCP to ``ports``
    only and bind none (pool/agent.py), called with the job's relay ports when it has any.
    """
    failed = []
    if len(sys.argv) > 1:
        # What the imports print or warn would otherwise reach the run's output as the program's.
        saved = [os.dup(1), os.dup(2)]
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        os.close(quiet)
        # The imports make hundreds of thousands of objects that live as long as the process, so
        # the collections they would trigger find nothing to free; frozen afterwards, the
        # program's own full collections skip them too. numpy+pandas in the runner image, median
        # of 30 (user + system): 261 -> 241 ms of CPU.
        gc.disable()
        for name in sys.argv[1:]:
            try:
                __import__(name)
            except BaseException:
                failed.append(name)
        gc.freeze()
        gc.enable()
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in enumerate(saved, 1):
            os.dup2(copy, fd)
            os.close(copy)
    os.write(4, ("r" + ",".join(failed)).encode())
    os.close(4)
    del failed
    job = bytearray()
    while True:
        chunk = os.read(3, 1048576)
        if not chunk:
            break
        job += chunk
    os.close(3)
    # "cpu address_space nargs nenv nports", the ports and the length of each piece, a newline, then
    # the pieces: the entrypoint, its code, the args, the env's names and values, the files' paths
    # and contents.
    newline = job.index(b"\n")
    cpu_seconds, address_space, nargs, nenv, nports, *numbers = (int(v) for v in job[:newline].split())
    ports, lengths = numbers[:nports], numbers[nports:]
    view = memoryview(job)[newline + 1 :]
    pieces = []
    for size in lengths:
        pieces.append(view[:size])
        view = view[size:]
    entrypoint = bytes(pieces[0]).decode()
    source = bytes(pieces[1])
    args = [bytes(arg).decode() for arg in pieces[2 : 2 + nargs]]
    install(pieces[2 + nargs : 2 + nargs + nenv], pieces[2 + nargs + nenv :])
    del view, pieces, job
    if ports:
        # Its data sources' relays are all the program may reach by TCP, and it may listen on none.
        try:
            restrict_connects(ports)
        except OSError as exc:
            print(f"warmpod: could not confine the program's network: {exc}", file=sys.stderr)
            end(1)
    del ports, numbers, restrict_connects
    if cpu_seconds or address_space:
        import resource

        if cpu_seconds:
            # RLIMIT_CPU counts this process's CPU since it started, preloading included: the
            # program's budget starts now (rounded up to the whole second the limit counts in).
            used = sum(os.times()[:2])
            start = int(-(-used // 1))
            resource.setrlimit(resource.RLIMIT_CPU, (start + cpu_seconds, start + cpu_seconds + 1))
        if address_space:
            # On top of what the preloaded interpreter maps already (numpy, pandas and pyarrow
            # map some 350 MB of address space before the program allocates a byte).
            with open("/proc/self/statm") as f:
                mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (mapped + address_space, mapped + address_space))
        del sys.modules["resource"], resource
    work = os.getcwd()
    path = os.path.join(work, entrypoint)
    # A project's entrypoint came with its files; code sent as ``code`` is written there first.
    if os.path.lexists(entrypoint):
        with open(entrypoint, "rb") as f:
            source = f.read()
    else:
        try:
            write_new(entrypoint, source)
        except OSError as exc:
            print(f"warmpod: could not write {entrypoint!r}: {exc}", file=sys.stderr)
            end(1)
    # As ``python3 ENTRYPOINT`` from /work: its own directory first, then the project's root, as
    # if the project were installed, so ``from report.helpers import x`` works from any entrypoint.
    here = os.path.dirname(path)
    sys.path[0:0] = [here] if here == work else [here, work]
    module = type(sys)("__main__")
    module.__dict__.update(
        __file__=path,
        __builtins__=builtins,
        __cached__=None,
        __annotations__={},
        __loader__=None,
        __spec__=None,
        __package__=None,
    )
    sys.modules["__main__"] = module
    sys.argv[:] = [entrypoint, *args]
    sys.orig_argv[:] = [sys.executable, "-I", entrypoint, *args]
    del args, here, work
    try:
        code = compile(source, path, "exec", dont_inherit=True)
    except SyntaxError as exc:
        # Python 3.12+ prints exc.__traceback__ whatever tb is passed: drop this frame from it.
        sys.excepthook(type(exc), exc.with_traceback(None), None)
        end(1)
    status = 0
    try:
        exec(code, module.__dict__)
    except SystemExit as exc:
        status = exit_status(exc.code)
    except BaseException as exc:
        if exc.__traceback__ is not None:
            exc.__traceback__ = exc.__traceback__.tb_next
        sys.excepthook(type(exc), exc, exc.__traceback__)
        status = 130 if isinstance(exc, KeyboardInterrupt) else 1
    end(status, module.__dict__)


def install(env: list[memoryview], files: list[memoryview]) -> None:
    """Add the job's environment variables (name, value, name, ...) and write its input files
    (path, content, ...) as this, the program's, user, before its CPU budget starts. The server
    checked every name and path; /work is a fresh tmpfs, so nothing in it can redirect a write."""
    for name, value in zip(env[::2], env[1::2], strict=True):
        os.environ[bytes(name).decode()] = bytes(value).decode()
    os.mkdir(OUT_DIR, 0o755)
    for path, content in zip(files[::2], files[1::2], strict=True):
        try:
            write_new(bytes(path).decode(), content)
        except OSError as exc:
            print(f"warmpod: could not write the input file {bytes(path).decode()!r}: {exc}", file=sys.stderr)
            end(1)


def write_new(name: str, content: "bytes | memoryview") -> None:
    """Create the file ``name`` under the working directory, its directories too, with ``content``."""
    parent = os.path.dirname(name)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view) :]
    os.close(fd)


def exit_status(code: object) -> int:
    """The status ``sys.exit(code)`` ends the interpreter with: None is 0, an int is itself,
    anything else is printed to stderr and is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def end(status: int, namespace: dict[str, object] | None = None) -> "NoReturn":
    """End as Py_Finalize would, up to module teardown: threads, atexit, ``namespace`` released
    (the program's files closed and flushed with its globals), stdout and stderr flushed."""
    if "threading" in sys.modules:
        sys.modules["threading"]._shutdown()
    import atexit

    atexit._run_exitfuncs()
    if namespace is not None:
        namespace.clear()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            status = status or 120
    announce_exit(status & 255)
    os._exit(status & 255)


def announce_exit(status: int) -> None:
    """Name this thread ``warmpod-exit<status>``, then close stdout and stderr.

    The agent reads the name once both pipes are closed (pool/agent.py, EXIT_NAME) and answers
    without waiting for the kernel to free this process (7-13 ms with pandas loaded).
    """
    try:
        import ctypes  # loaded already: the agent this process was forked from uses it

        libc = ctypes.CDLL(None)
        if libc.prctl(15, f"{EXIT_NAME}{status}".encode(), 0, 0, 0) != 0:  # PR_SET_NAME
            return
    except Exception:
        return  # the agent waits for the exit instead
    os.closerange(1, 3)  # stdout and stderr, whatever the program did to them
