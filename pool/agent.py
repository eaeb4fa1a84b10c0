"""warmpod's in-container agent: runs exactly one job in a fresh interpreter and reports the result.

Started as the container's command (PID 1, container root with only the capabilities needed to
drop privileges and kill). Before the server connects, it pre-spawns the user's interpreter as an
unprivileged user (a fork of its own interpreter), blocked on a private pipe, so a job costs
no interpreter start-up. It then listens on SOCKET_PATH for one connection, says hello, waits for
one job, feeds the job to the interpreter, streams stdout and stderr up to a cap as they come,
stops the program at its end or a limit (``Run.stop``), sends the files it left in out/ and one
result.

Names the server shares with it (protocol version, socket path, out/, MAX_PATH, the settings'
environment variables) are checked against the server's by tests/unit/test_agent_run.py.

Frames on the socket are a 4-byte big-endian length followed by a JSON object with a "type"
field. Stdlib only: the runner image carries nothing warmpod-specific besides this file and the
program's bootstrap (pool/bootstrap.py), both compiled to bytecode by the image build and run from it
(``python3 -I agent.pyc``: no compile at start; every container pays its start-up, once: the
program's interpreter is the agent's, forked, not a second one).
"""

# The C halves of json, socket and signal, which those modules wrap: the modules themselves import
# re, enum, collections and functools, about 12 ms of CPU at every container's start (of 15 ms for
# all the agent's imports, measured with -X importtime in the runner image).
import _json
import _signal  # type: ignore[import-not-found]  # typeshed has no stub; signal wraps it
import _socket
import binascii
import builtins
import fcntl
import marshal
import os
import resource
import select
import stat
import struct
import sys
import time

# Annotations name these for mypy only: importing typing would cost every container's start-up.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

    Message = dict[str, Any]
    """One frame's JSON object."""

SOCKET_PATH = "/run/warmpod/agent.sock"
WORKDIR = "/work"
RUN_UID = 65534
RUN_GID = 65534
# matplotlib's directory for the program (MPLCONFIGDIR): writable, fresh with each container, with
# links to the font cache the image build made (pool/finish_image.py), so that no run rebuilds it
# (matplotlib reads the cache only from MPLCONFIGDIR, which must be writable, and /tmp is a tmpfs
# the image cannot fill).
MATPLOTLIB_DIR = "/tmp/matplotlib"
IMAGE_MATPLOTLIB_DIR = "/opt/warmpod/matplotlib"
# The program's niceness: the agent (0) keeps the CPU it needs to stream output, enforce the limits
# and kill everything at the deadline however many processes the program spins up. At 19 a
# spinner weighs 15 against the agent's 1024 (at 10 it was 110: 48 spinners left the agent 16% of
# the container's CPU, too little on UML 7.2 to answer within the server's grace). Without
# CAP_SYS_NICE and with RLIMIT_NICE at 0 the program cannot lower it again.
PROGRAM_NICE = 19
# A job carries the program and its input files in base64 (files.in_bytes at most 48 MiB).
MAX_JOB_FRAME = 128 * 1024 * 1024
CHUNK = 65536
# Output is sent when this much of one stream waits (one frame's worth at most: CHUNK) or when
# its first byte has waited OUTPUT_FLUSH_SECONDS: a program writing a byte at a time costs the
# server one frame per interval, not one per byte, and what it printed waits no longer than that
# in the agent (an OOM kill of the agent loses at most that much).
OUTPUT_FLUSH_BYTES = CHUNK
OUTPUT_FLUSH_SECONDS = 0.005
CPU_CHECK_INTERVAL = 0.1
# CPU seconds the interpreter may spend preloading, above the run's budget, before the program starts.
START_CPU_SECONDS = 60
JOB_FD = 3
READY_FD = 4
# The program's interpreter runs this (pool/bootstrap.py, compiled by the image build).
BOOTSTRAP = "/opt/warmpod/bootstrap.pyc"
PROTOCOL_VERSION = 2
LANDLOCK_ABI = 0


class _JSONContext:
    """The settings ``_json.make_scanner`` reads, as json.JSONDecoder() has them by default."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = None
    memo = None


# json.dumps(message, separators=(",", ":")) and json.loads, without the json package: the encoder
# escapes every character outside ASCII (protocol.py relies on it) and refuses NaN and infinities.
# typeshed types the C functions as json.encoder and json.scanner call them (a default function,
# a scanner context of their own class), not as this module calls them.
_encode = _json.make_encoder(
    None,
    None,  # type: ignore[arg-type]
    _json.encode_basestring_ascii,
    None,
    ":",
    ",",
    False,
    False,
    False,
)
_scan = _json.make_scanner(_JSONContext())  # type: ignore[arg-type]


def dumps(message: "Message") -> str:
    return "".join(_encode(message, 0))


def loads(data: bytes) -> "Message":
    text = data.decode()
    value: Message
    value, end = _scan(text, 0)
    if end != len(text):
        raise ValueError("extra data after the JSON value")
    return value


def send_frame(conn: _socket.socket, message: "Message") -> None:
    body = dumps(message).encode()
    conn.sendall(struct.pack(">I", len(body)) + body)


def recv_exactly(conn: _socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = conn.recv(min(size - len(buf), CHUNK))
        if not chunk:
            raise EOFError("server closed the connection")
        buf += chunk
    return bytes(buf)


def recv_frame(conn: _socket.socket) -> "Message":
    (size,) = struct.unpack(">I", recv_exactly(conn, 4))
    if size > MAX_JOB_FRAME:
        raise ValueError(f"frame of {size} bytes exceeds {MAX_JOB_FRAME}")
    return loads(recv_exactly(conn, size))


def pipe_above(low: int) -> tuple[int, int]:
    """A pipe whose ends are numbered above ``low``, so fds 3 and 4 stay free to place."""
    r, w = os.pipe()
    high = (fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, low), fcntl.fcntl(w, fcntl.F_DUPFD_CLOEXEC, low))
    os.close(r)
    os.close(w)
    return high


# Landlock (Linux 5.13+): the program may write only beneath its working directory, /tmp and
# /dev/shm, and to a few harmless devices, whatever the mounts and permissions would allow.
LANDLOCK_WRITABLE_DIRS = (WORKDIR, "/tmp", "/dev/shm")
LANDLOCK_WRITABLE_FILES = ("/dev/null", "/dev/zero", "/dev/full")
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_WRITE_FILE, _TRUNCATE = 1 << 1, 1 << 14
# REMOVE_DIR, REMOVE_FILE and every MAKE_* right.
_CHANGE_TREE = sum(1 << bit for bit in range(4, 13))
_REFER = 1 << 13
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2
# ABI 4 and later: TCP binds and connects, by port.
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
# ABI 8 and later: restrict every thread of the process at once, not only the caller.
_RESTRICT_SELF_TSYNC = 1 << 3


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where it has none or seccomp hides it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    version = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(version), 0)


def enforce_ruleset(handled: bytes, rules: "list[tuple[int, bytes, str]]", flags: int = 0) -> None:
    """Create a Landlock ruleset (``handled``: its struct landlock_ruleset_attr), add ``rules``
    (rule type, rule attr, what to name in an error) and restrict the calling thread with it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    attr = ctypes.create_string_buffer(handled, len(handled))
    ruleset = libc.syscall(
        _SYS_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(len(handled)), ctypes.c_uint32(0)
    )
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    try:
        for rule_type, rule, what in rules:
            if (
                libc.syscall(
                    _SYS_LANDLOCK_ADD_RULE,
                    ctypes.c_int(ruleset),
                    ctypes.c_int(rule_type),
                    ctypes.create_string_buffer(rule, len(rule)),
                    ctypes.c_uint32(0),
                )
                < 0
            ):
                raise OSError(ctypes.get_errno(), f"landlock_add_rule {what}")
        if libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(flags)) < 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(ruleset)


def restrict_writes(abi: int) -> None:
    """Confine the calling process's writes with Landlock; a no-op where the ABI is 0."""
    if abi <= 0:
        return
    handled = _WRITE_FILE | _CHANGE_TREE | (_REFER if abi >= 2 else 0) | (_TRUNCATE if abi >= 3 else 0)
    opened = []
    try:
        for path, access in [(p, handled) for p in LANDLOCK_WRITABLE_DIRS] + [
            (p, handled & (_WRITE_FILE | _TRUNCATE)) for p in LANDLOCK_WRITABLE_FILES
        ]:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            opened.append((fd, access, path))
        rules = [(_RULE_PATH_BENEATH, struct.pack("=Qi", access, fd), path) for fd, access, path in opened]
        enforce_ruleset(struct.pack("=Q", handled), rules)
    finally:
        for fd, _, _ in opened:
            os.close(fd)


def restrict_connects(ports: list[int]) -> None:
    """Let the calling process connect by TCP to ``ports`` only, and bind no TCP port (Landlock
    ABI 4 and later; a no-op below). The bootstrap calls it at job time, with the relays' ports.

    Below ABI 8 it restricts the calling thread and those it starts, not the threads the preloaded
    modules started already (OpenBLAS's, where numpy is preloaded with more than one thread): a
    program that took one of those over (ctypes writes any memory of its process) could connect
    from it to another port of the container's loopback, the only network the container has.
    """
    if LANDLOCK_ABI < 4:
        return
    rules = [(_RULE_NET_PORT, struct.pack("=QQ", _NET_CONNECT_TCP, port), f"port {port}") for port in ports]
    flags = _RESTRICT_SELF_TSYNC if LANDLOCK_ABI >= 8 else 0
    enforce_ruleset(struct.pack("=QQ", 0, _NET_BIND_TCP | _NET_CONNECT_TCP), rules, flags)


# The seccomp profile keeps only the native architecture; a system call through another entry
# point (int 0x80 or x32 on x86_64, AArch32 on aarch64) gets the runtime's bad-arch action, which
# kills only the calling thread, so a program with other threads (OpenBLAS's, once numpy is
# preloaded) lived on, hung until its timeout. This filter, stacked on the profile, makes such a
# call kill the whole process (the strictest action of all filters wins). Seven BPF instructions,
# so no libseccomp binding in the image for it.
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_X32_SYSCALL_BIT = 0x40000000
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_SECCOMP_RET_KILL_PROCESS, _SECCOMP_RET_ALLOW = 0x80000000, 0x7FFF0000
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x06


def kill_foreign_syscalls() -> None:
    """Install a seccomp filter that kills the process at any non-native system call."""
    import ctypes

    machine = os.uname().machine
    if machine not in _AUDIT_ARCH:
        return
    program = [
        (_BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (_BPF_JEQ_K, 1, 0, _AUDIT_ARCH[machine]),
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_KILL_PROCESS),
        (_BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
    ]
    if machine == "x86_64":
        program += [(_BPF_JGE_K, 0, 1, _X32_SYSCALL_BIT), (_BPF_RET_K, 0, 0, _SECCOMP_RET_KILL_PROCESS)]
    program.append((_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW))

    class SockFilter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(program))(*[SockFilter(*insn) for insn in program])
    fprog = SockFprog(len(program), filters)
    # no_new_privs is already set (the container spec), which lets an unprivileged process do it.
    prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), what="PR_SET_SECCOMP")


PR_CAPBSET_DROP = 24
PR_SET_DUMPABLE = 4


def prctl(option: int, arg2: int, arg3: int = 0, *, what: str) -> None:
    """prctl(2), raising OSError (its errno, ``what``) where it fails."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), what)


def set_dumpable() -> None:
    """Make the process dumpable again, so its /proc files are its own uid's, as after an exec."""
    prctl(PR_SET_DUMPABLE, 1, what="PR_SET_DUMPABLE")


def drop_bounding_set() -> None:
    """Empty the capability bounding set (needs CAP_SETPCAP): nothing can ever give the program one."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        prctl(PR_CAPBSET_DROP, cap, what=f"PR_CAPBSET_DROP {cap}")


def env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def prepare_matplotlib() -> None:
    """As the program's user: its MPLCONFIGDIR, linking the font cache the image build made."""
    os.mkdir(MATPLOTLIB_DIR, 0o700)
    if os.path.isdir(IMAGE_MATPLOTLIB_DIR):
        for name in os.listdir(IMAGE_MATPLOTLIB_DIR):
            os.symlink(os.path.join(IMAGE_MATPLOTLIB_DIR, name), os.path.join(MATPLOTLIB_DIR, name))


def prepare_program() -> None:
    """In the forked child, before it becomes the program: OOM preference, then the unprivileged
    user, its niceness, limits."""
    # The program, not the agent, is what the OOM killer should pick. Where this process's
    # CAP_SYS_RESOURCE counts on the host (rootful, no user namespace) 1000 is also the floor the
    # program cannot lower; elsewhere Landlock, where the kernel has it, keeps it out of /proc.
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    drop_bounding_set()
    os.setgroups([])
    os.setgid(RUN_GID)
    os.setuid(RUN_UID)
    prepare_matplotlib()
    os.setpriority(os.PRIO_PROCESS, 0, PROGRAM_NICE)
    cpu = env_int("WARMPOD_CPU_SECONDS")
    if cpu:
        # A bound on the start-up (preloading) only: the bootstrap sets the program's own budget,
        # SIGXCPU at the soft limit and SIGKILL a second later, once the preload is done.
        resource.setrlimit(resource.RLIMIT_CPU, (cpu + START_CPU_SECONDS, cpu + START_CPU_SECONDS + 1))
    fsize = env_int("WARMPOD_FSIZE_BYTES")
    if fsize:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    restrict_writes(LANDLOCK_ABI)
    kill_foreign_syscalls()


def own_cgroup() -> bool:
    # Rootless Podman on cgroup v1 gives a container no cgroup of its own: the files it sees are
    # its parent's (the host's root cpuacct, say), shared with every other process, so their
    # counters say nothing about this container. The server says so with WARMPOD_CGROUP_COUNTERS=0.
    return os.environ.get("WARMPOD_CGROUP_COUNTERS") != "0"


def cgroup_counter(key: str, *paths: str) -> int | None:
    """A counter from the container's cgroup events file (v2 path first, then v1), or None."""
    if not own_cgroup():
        return None
    for path in paths:
        try:
            with open(path) as f:
                for line in f:
                    name, _, value = line.partition(" ")
                    if name == key and value.strip().isdigit():
                        return int(value)
        except OSError:
            continue
    return None


def oom_kills() -> int | None:
    return cgroup_counter(
        "oom_kill", "/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"
    )


def memory_in_use() -> int:
    """Bytes the container's memory cgroup holds now (v2, then v1), or 0 where unknown."""
    for path in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
        try:
            with open(path) as f:
                return int(f.read())
        except (OSError, ValueError):
            continue
    return 0


def pids_max_hits() -> int | None:
    return cgroup_counter("max", "/sys/fs/cgroup/pids.events", "/sys/fs/cgroup/pids/pids.events")


def container_cpu_seconds() -> float | None:
    """CPU time of every process in the container so far (cgroup v2, then v1), or None."""
    if not own_cgroup():
        return None
    usec = cgroup_counter("usage_usec", "/sys/fs/cgroup/cpu.stat")
    if usec is not None:
        return usec / 1e6
    try:
        with open("/sys/fs/cgroup/cpuacct/cpuacct.usage") as f:
            return int(f.read()) / 1e9
    except (OSError, ValueError):
        return None


def program_cpu_seconds() -> float | None:
    """CPU time of the program's processes so far: the container's minus the agent's own, or None."""
    total = container_cpu_seconds()
    if total is None:
        return None
    # The agent's polling is not the program's: on a slow host (User-Mode Linux) it adds up.
    own = resource.getrusage(resource.RUSAGE_SELF)
    return total - own.ru_utime - own.ru_stime


def filesystem_full(path: str) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail == 0 or (st.f_files > 0 and st.f_favail == 0)


class Program:
    """The interpreter's process and the agent's ends of its stdin, stdout and stderr pipes."""

    def __init__(self, pid: int, stdin: int, stdout: int, stderr: int) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None

    def collect(self, options: int) -> int | None:
        """Wait for the process with ``os.waitpid`` ``options``; its exit code, or None while it runs."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, options)
            except ChildProcessError:  # reaped already, by reap(), which kept its code
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self.collect(os.WNOHANG)

    def wait(self) -> int | None:
        return self.collect(0)

    def close_stdin(self) -> None:
        if self.stdin >= 0:
            os.close(self.stdin)
            self.stdin = -1


def become_program(env: dict[str, str], preload: list[str]) -> "NoReturn":
    """In the forked child, privileges dropped: take the program's environment, run the bootstrap.

    No exec: the agent's interpreter, started as ``python3 -I`` like the program's would be, goes
    on as the program's. A second interpreter's start-up cost every container about 14 ms of CPU;
    there is nothing in the agent's memory that the program may not see (it holds no secret: the
    job comes later, over the socket, to the agent alone). Never returns.
    """
    os.environ.clear()
    os.environ.update(env)
    # Changing uid made the process undumpable, /proc/self root's: as exec would, undo that.
    set_dumpable()
    sys.argv[:] = [BOOTSTRAP, *preload]
    with open(BOOTSTRAP, "rb") as f:
        code = marshal.loads(f.read()[16:])  # after the .pyc header
    bootstrap: dict[str, Any] = {"__name__": "warmpod_bootstrap", "__builtins__": builtins}
    exec(code, bootstrap)
    try:
        bootstrap["boot"](restrict_connects)  # ends the process itself
    except BaseException:
        sys.excepthook(*sys.exc_info())
    os._exit(1)


def spawn_interpreter() -> tuple[Program, int, int]:
    """Start the user's interpreter now, so a job does not wait for its start-up.

    A plain fork: the subprocess module (and what it imports) would cost every container several
    milliseconds of CPU at the agent's start, and the child does not exec (become_program).
    """
    # All above 10, so that placing them on 0-4 in the child overwrites none of them.
    stdin_r, stdin_w = pipe_above(10)
    stdout_r, stdout_w = pipe_above(10)
    stderr_r, stderr_w = pipe_above(10)
    job_r, job_w = pipe_above(10)
    ready_r, ready_w = pipe_above(10)
    threads = max(env_int("WARMPOD_THREADS") or 1, 1)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": WORKDIR,
        "TMPDIR": "/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",
        "MPLCONFIGDIR": MATPLOTLIB_DIR,
        # numpy's OpenBLAS (and OpenMP, where a library uses it) start one thread per host core
        # unless told; sized to the container's CPU quota instead. That also saves importing numpy
        # about 100 ms of CPU (400 against 300 ms for numpy and pandas, in the runner image on 2 cores).
        "OPENBLAS_NUM_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        # pyarrow (which pandas imports) starts its bundled jemalloc's purging thread at import
        # in every container (5 ms of CPU per pandas run under load), though its default memory
        # pool is mimalloc: jemalloc purges as it allocates instead, if a program picks it.
        "JE_ARROW_MALLOC_CONF": "background_thread:false",
    }
    preload = [name for name in os.environ.get("WARMPOD_PRELOAD", "").split(",") if name]
    open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    pid = os.fork()
    if pid == 0:
        # The child never returns into the agent: it becomes the program or exits, reporting why on
        # the ready pipe.
        try:
            # The bootstrap expects the job on 3 and reports readiness on 4.
            placed = ((stdin_r, 0), (stdout_w, 1), (stderr_w, 2), (job_r, JOB_FD), (ready_w, READY_FD))
            for source, target in placed:
                os.dup2(source, target)
            os.chdir(WORKDIR)
            os.setsid()
            _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
            prepare_program()
            os.closerange(READY_FD + 1, open_files)
            become_program(env, preload)
        except BaseException as exc:
            try:
                os.write(READY_FD, b"e" + repr(exc).encode(errors="replace")[:1000])
            finally:
                os._exit(127)
    for fd in (stdin_r, stdout_w, stderr_w, job_r, ready_w):
        os.close(fd)
    return Program(pid, stdin_w, stdout_r, stderr_r), job_w, ready_r


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` so far (from /proc), 0.0 if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def wait_ready(ready_r: int, proc: Program) -> list[str]:
    """Block until the interpreter has started and preloaded; return the modules that failed."""
    report = b""
    while chunk := os.read(ready_r, 4096):
        report += chunk
    os.close(ready_r)
    if proc.poll() is not None or not report.startswith(b"r"):
        detail = report[1:].decode(errors="replace")
        raise RuntimeError(f"interpreter exited during start-up with {proc.wait()}: {detail}")
    return [name for name in report[1:].decode(errors="replace").split(",") if name]


def reap(proc: Program) -> None:
    """Collect every child that has ended: as PID 1 the agent inherits the program's orphans, whose
    zombies would count against the pids limit. The interpreter's status goes to ``proc``."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)


def kill_everything() -> None:
    # PID 1 survives kill(-1); every process of the run, double-forked or not, does not.
    try:
        os.kill(-1, _signal.SIGKILL)
    except ProcessLookupError:
        pass


def b64(data: bytes | memoryview) -> str:
    return binascii.b2a_base64(data, newline=False).decode()


class PendingOutput:
    """What the program printed and the server has not been sent yet: one stream's bytes, in order.

    Bytes of the other stream send these first, so the server sees the order the agent read."""

    def __init__(self, conn: _socket.socket) -> None:
        self.conn = conn
        self.stream: str | None = None
        self.data = bytearray()
        self.since = 0.0

    def add(self, stream: str, data: bytes) -> None:
        if self.data and stream != self.stream:
            self.flush()
        if not self.data:
            self.stream = stream
            self.since = time.monotonic()
        self.data += data
        if len(self.data) >= OUTPUT_FLUSH_BYTES:
            self.flush()

    def due(self) -> float | None:
        """When the waiting bytes must be sent; None when none wait."""
        return self.since + OUTPUT_FLUSH_SECONDS if self.data else None

    def flush(self) -> None:
        view = memoryview(self.data)
        for start in range(0, len(view), CHUNK):
            send_frame(
                self.conn, {"type": "output", "stream": self.stream, "data": b64(view[start : start + CHUNK])}
            )
        view.release()
        self.data.clear()


# The bootstrap's last act before os._exit, once stdout and stderr are flushed and closed: it
# names its thread after the exit code (prctl PR_SET_NAME), so the agent can answer without
# waiting for the kernel to free the process (7-13 ms with pandas loaded). No descriptor or file
# for it: the program starts with 0, 1 and 2 only. A program that names itself so and closes its
# output only ends early, with a code it could have exited with.
EXIT_NAME = b"warmpod-exit"


def named_exit(pid: int) -> int | None:
    """The exit code ``pid`` announced in its name (``EXIT_NAME`` and the code), or None."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            name = f.read(64).rstrip(b"\n")
    except OSError:
        return None
    code = name.removeprefix(EXIT_NAME)
    if code != name and code.isdigit() and int(code) < 256:
        return int(code)
    return None


# Why the agent stops a run's program. The limits among them are what the result's limits_hit
# names; "exited" is the program's own end (or its announced one, EXIT_NAME).
LIMIT_STOPS = ("wall_time", "cpu_time", "output")
# Once stopped, by any reason, the agent reads what the pipes still hold for this long at most: the
# loop then ends, the interpreter is reaped and the result sent. Every stop comes by the job's
# timeout, so the agent answers by the timeout plus this; the server waits that long and a margin
# more (runner.SERVER_GRACE, held to it by tests/unit/test_agent_run.py).
DRAIN_GRACE = 0.5


def job_pieces(
    cpu: int,
    address_space: int,
    entrypoint: bytes,
    code: bytes,
    args: list[bytes],
    env: list[bytes],
    files: list[tuple[bytes, bytes]],
    ports: list[int],
) -> list[bytes]:
    """The job as the bootstrap reads it: a header line of numbers (the CPU seconds, the address
    space, the counts of args and env parts, the count of relay ports and the ports, then the length
    of every piece), then the pieces: the entrypoint's path, its code (empty when it is among the
    files), each arg, each env name and value, each file's path and content."""
    pieces = [entrypoint, code, *args, *env, *(part for file in files for part in file)]
    numbers = [cpu, address_space, len(args), len(env), len(ports), *ports, *(len(piece) for piece in pieces)]
    return [" ".join(map(str, numbers)).encode() + b"\n", *pieces]


# Data sources (a job's "sources"): the program reaches each through a TCP listener of the agent's
# on the container's loopback, named in its environment; every connection it opens there is
# carried byte for byte, unframed, over a Unix socket the server made for that source in AGENT_DIR
# (which the program cannot enter), and the server carries it on to the declared upstream. In the
# run's own poll loop, no thread: whatever the program does, the agent holds at most
# MAX_RELAYS connections and RELAY_BUFFER bytes per connection and direction, and a side that does
# not read stops the reads from the other.
MAX_RELAYS = 64
"""Connections relayed at once, all sources together; past it the program's next are closed at once."""
RELAY_BUFFER = CHUNK
"""Bytes held per connection and direction: 8 MiB at most for MAX_RELAYS connections both ways."""
RELAY_ACCEPTS = 16
"""Connections accepted per wake-up at most: a flood of them must not starve the output's pipes."""
# Descriptors the agent keeps beside its relays' two each (its socket, the program's pipes, the
# pidfd, the listeners, a file of out/ being sent): the relays never meet RLIMIT_NOFILE, whose
# EMFILE would leave a listener forever readable and the loop spinning.
AGENT_FDS = 32


class Relay:
    """One connection of the program's carried to its source's Unix socket.

    ``ends`` are the program's TCP socket and the server's Unix socket; ``held[side]`` is what
    ``ends[side]`` sent that the other end has not taken yet, at most RELAY_BUFFER bytes.
    """

    def __init__(self, program: _socket.socket, server: _socket.socket) -> None:
        self.ends = (program, server)
        self.held = (bytearray(), bytearray())
        self.ended = [False, False]
        """``ends[side]`` sent its end (its writing side shut, or it closed)."""
        self.passed = [False, False]
        """That end was passed on: the other end's writing side is shut."""
        self.events = [0, 0]
        """What the poller waits for on each end; 0 while it is not registered."""

    def pump(self, side: int) -> None:
        """Move what ``ends[side]`` sent on to the other end, as far as neither blocks.

        Raises:
            OSError: either end failed (reset, or closed while bytes were still owed to it).
        """
        source, target, held = self.ends[side], self.ends[1 - side], self.held[side]
        if not self.ended[side] and len(held) < RELAY_BUFFER:
            try:
                data = source.recv(RELAY_BUFFER - len(held))
            except BlockingIOError:
                pass
            else:
                held += data
                self.ended[side] = not data
        if held:
            try:
                del held[: target.send(held)]
            except BlockingIOError:
                pass
        if self.ended[side] and not held and not self.passed[side]:
            target.shutdown(_socket.SHUT_WR)
            self.passed[side] = True

    def wanted(self, side: int) -> int:
        """The poll events ``ends[side]`` waits for: bytes to read while there is room, room to write."""
        events = 0
        if not self.ended[side] and len(self.held[side]) < RELAY_BUFFER:
            events |= select.POLLIN
        if self.held[1 - side]:
            events |= select.POLLOUT
        return events

    @property
    def done(self) -> bool:
        """Both directions ended and were passed on."""
        return self.passed[0] and self.passed[1]


class Relays:
    """A run's listeners, one per data source, and the connections relayed through them, served
    from the run's poll loop (``handle``)."""

    def __init__(self, sources: "list[list[str]]", poller: "select.poll") -> None:
        """Listen on the loopback for each ``(name, unix socket path)`` of ``sources``; ``poller``
        waits for their connections from now on."""
        self.poller = poller
        self.listeners: dict[int, tuple[_socket.socket, str]] = {}
        """By descriptor: a source's listener and the path of its Unix socket."""
        self.relays: dict[int, tuple[Relay, int]] = {}
        """By descriptor: the relay that socket is an end of, and which end."""
        self.env: list[str] = []
        """The program's variables naming the listeners: name, value, name, value..."""
        self.ports: list[int] = []
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        room = MAX_RELAYS if open_files < 0 else (open_files - AGENT_FDS - len(sources)) // 2
        self.max_relays = max(0, min(MAX_RELAYS, room))
        for name, path in sources:
            listener = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            listener.listen(MAX_RELAYS)
            listener.setblocking(False)
            port = int(listener.getsockname()[1])
            self.listeners[listener.fileno()] = (listener, path)
            self.poller.register(listener.fileno(), select.POLLIN)
            self.ports.append(port)
            upper = name.upper()
            self.env += [
                f"WARMPOD_SOURCE_{upper}",
                f"127.0.0.1:{port}",
                f"WARMPOD_SOURCE_{upper}_HOST",
                "127.0.0.1",
                f"WARMPOD_SOURCE_{upper}_PORT",
                str(port),
            ]

    def handle(self, fd: int) -> None:
        """Serve what happened on ``fd``, a listener's or a relay's (nothing if it is neither now)."""
        if fd in self.listeners:
            self.accept(*self.listeners[fd])
            return
        found = self.relays.get(fd)
        if found is None:
            return  # an end of a relay dropped earlier in the same wake-up
        relay = found[0]
        try:
            relay.pump(0)
            relay.pump(1)
        except OSError:
            self.drop(relay)
            return
        if relay.done:
            self.drop(relay)
        else:
            self.watch(relay)

    def accept(self, listener: _socket.socket, path: str) -> None:
        """Take the connections waiting on ``listener``: relay each to ``path``, or close it at once
        past ``max_relays`` or where the server's socket cannot be reached."""
        for _ in range(RELAY_ACCEPTS):
            try:
                fd, _address = listener._accept()  # type: ignore[attr-defined]  # socket.accept's C half
            except BlockingIOError:
                return
            except OSError:  # the connection was reset before it was taken
                continue
            program = _socket.socket(fileno=fd)
            if len(self.relays) // 2 >= self.max_relays:
                program.close()
                continue
            server = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            try:
                server.setblocking(False)
                # A Unix socket connects at once, or fails at once (EAGAIN: the server's backlog is full).
                server.connect(path)
                program.setblocking(False)
                # What the program sent goes on as it came: its own writes already chose the sizes.
                program.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            except OSError:
                server.close()
                program.close()
                continue
            relay = Relay(program, server)
            for side, end in enumerate(relay.ends):
                self.relays[end.fileno()] = (relay, side)
            self.watch(relay)

    def watch(self, relay: Relay) -> None:
        """Wait on each end of ``relay`` for what it can do now; an end that can do nothing is not
        polled at all, so that a hang-up it reports cannot wake the loop again and again."""
        for side, end in enumerate(relay.ends):
            wanted = relay.wanted(side)
            if wanted == relay.events[side]:
                continue
            if not wanted:
                self.poller.unregister(end.fileno())
            elif relay.events[side]:
                self.poller.modify(end.fileno(), wanted)
            else:
                self.poller.register(end.fileno(), wanted)
            relay.events[side] = wanted

    def drop(self, relay: Relay) -> None:
        """Close both ends of ``relay``."""
        for side, end in enumerate(relay.ends):
            if relay.events[side]:
                self.poller.unregister(end.fileno())
            self.relays.pop(end.fileno(), None)
            end.close()

    def shut(self) -> None:
        """Take no more connections: close the listeners (the program's next connects are refused)."""
        for fd, (listener, _path) in self.listeners.items():
            self.poller.unregister(fd)
            listener.close()
        self.listeners.clear()

    def close(self) -> None:
        """Cut every connection, once what the program sent before it ended went on as far as the
        server's socket takes it without waiting."""
        self.shut()
        for relay, side in list(self.relays.values()):
            if side == 0:
                try:
                    relay.pump(0)
                except OSError:
                    pass
                self.drop(relay)


class Run:
    """One job's program at run time: feeds its stdin, streams its output, watches its limits and
    stops it through one path, ``stop(reason)``, which starts the drain grace."""

    def __init__(self, pending: PendingOutput, proc: Program, job: "Message") -> None:
        self.pending = pending
        self.proc = proc
        self.stdin = memoryview(binascii.a2b_base64(job["stdin"]))
        timeout = float(job["timeout"])
        self.cap = int(job["max_output_bytes"])
        container_cpu = env_int("WARMPOD_CPU_SECONDS")
        cpu_seconds = int(job.get("cpu_time") or 0)
        if container_cpu and cpu_seconds >= container_cpu:
            cpu_seconds = 0
        self.cpu_limit = cpu_seconds or container_cpu
        """The program's CPU seconds: the job's when lower than the container's; None or 0 for none."""
        # The interpreter's start-up is not the program's: its budget is counted from here on.
        self.startup_cpu = process_cpu_seconds(proc.pid)
        # Only where no memory cgroup applies, a coarse fallback: the bootstrap sets it once preloaded.
        address_space = int(job.get("address_space") or 0) or env_int("WARMPOD_AS_BYTES") or 0
        code = binascii.a2b_base64(job.pop("code"))
        entrypoint = str(job.get("entrypoint") or "main.py").encode()
        args = [str(arg).encode() for arg in job.get("args") or []]
        env = [str(part).encode() for pair in job.pop("env", None) or [] for part in pair]
        files = [(path.encode(), binascii.a2b_base64(content)) for path, content in job.pop("files", [])]
        self.poller = select.poll()
        sources = job.get("sources") or []
        self.relays = Relays(sources, self.poller) if sources else None
        """The data sources' listeners and connections; None for a job without sources."""
        ports = []
        if self.relays is not None:
            # After the job's own: the names are the agent's (the server refuses WARMPOD_ ones).
            env += [part.encode() for part in self.relays.env]
            ports = self.relays.ports
        self.pieces = job_pieces(
            self.cpu_limit or 0, address_space, entrypoint, code, args, env, files, ports
        )
        """What the bootstrap reads on its job pipe, in order."""
        del code, args, env, files
        self.oom_before, self.pids_before = oom_kills(), pids_max_hits()
        cpu_before = program_cpu_seconds()
        self.cpu_before = cpu_before or 0.0
        self.cpu_budget = self.cpu_limit if cpu_before is not None else None
        """What the cgroup's CPU counter may grow by (None where the container has no counter of
        its own, and once the budget was enforced)."""
        # The bootstrap rounds the start of the budget up to a whole second: the container-wide kill
        # comes that much later too, so that a single process still gets its SIGXCPU first.
        self.cpu_rounding = -(-self.startup_cpu // 1) - self.startup_cpu
        self.started = time.monotonic()
        self.end_by = self.started + timeout
        """When the watch ends: the timeout, until a stop brings it to at most DRAIN_GRACE later."""
        self.stopped = False
        self.exited = False
        """The program ended (its pidfd, its announced exit), or its wall time ran out."""
        self.named: int | None = None
        self.limits_hit: list[str] = []
        self.names = {proc.stdout: "stdout", proc.stderr: "stderr"}
        self.sent = {"stdout": 0, "stderr": 0}
        self.truncated = {"stdout": False, "stderr": False}
        self.outputs = {proc.stdout, proc.stderr}
        """The program's output pipes still open."""
        self.stdin_fd = -1
        self.pidfd = -1

    def start(self, job_w: int) -> None:
        """Hand the bootstrap its job (the program starts once the pipe closes), then watch the
        program's pipes and its exit."""
        for piece in self.pieces:
            view = memoryview(piece)
            while view:
                view = view[os.write(job_w, view) :]
        os.close(job_w)
        del self.pieces, view, piece
        for fd in self.outputs:
            os.set_blocking(fd, False)
            self.poller.register(fd, select.POLLIN)
        if self.stdin:
            self.stdin_fd = self.proc.stdin
            os.set_blocking(self.stdin_fd, False)
            self.poller.register(self.stdin_fd, select.POLLOUT)
        else:
            self.proc.close_stdin()
        self.pidfd = os.pidfd_open(self.proc.pid)
        self.poller.register(self.pidfd, select.POLLIN)

    def stop(self, reason: str) -> None:
        """Stop the program for ``reason``: kill every process of the run and drain the pipes for
        DRAIN_GRACE at most. A limit is recorded the first time it stops the run."""
        if reason in LIMIT_STOPS and reason not in self.limits_hit:
            self.limits_hit.append(reason)
        # Orphans (double forks, setsid) would hold the pipes open; an exited program's children end too.
        kill_everything()
        if self.relays is not None:
            self.relays.shut()
        drained = time.monotonic() + DRAIN_GRACE
        # The wall time stops the run at end_by itself: the grace starts there.
        self.end_by = drained if reason == "wall_time" else min(self.end_by, drained)
        self.stopped = True
        if reason in ("wall_time", "exited"):
            self.exited = True

    def watch(self) -> None:
        """Run the program until it ended and its pipes are drained, or a stop's drain grace is over."""
        while self.outputs or not self.exited:
            reap(self.proc)
            now = time.monotonic()
            if now >= self.end_by:
                if self.stopped:
                    break
                self.stop("wall_time")
                continue
            self.check_cpu()
            # Also the pace of reaping orphans.
            wait = min(self.end_by - now, CPU_CHECK_INTERVAL)
            due = self.pending.due()
            if due is not None:
                wait = max(0.0, min(wait, due - time.monotonic()))
            for fd, _event in self.poller.poll(wait * 1000):
                if fd == self.pidfd:
                    self.poller.unregister(self.pidfd)
                    self.stop("exited")
                elif fd == self.stdin_fd:
                    self.feed_stdin()
                elif fd in self.outputs:
                    self.pump_output(fd)
                elif self.relays is not None:
                    self.relays.handle(fd)
            due = self.pending.due()
            if due is not None and time.monotonic() >= due:
                self.pending.flush()
        self.pending.flush()

    def check_cpu(self) -> None:
        """Stop the program once all its processes together used up its CPU budget."""
        if self.cpu_budget is None or self.exited:
            return
        used = program_cpu_seconds()
        # RLIMIT_CPU counts per process; forking would multiply it. The cgroup counts all, and
        # stops them a second past the budget, where RLIMIT_CPU's hard limit would: a single
        # process still gets its SIGXCPU at the budget first.
        if used is not None and used - self.cpu_before >= self.cpu_budget + self.cpu_rounding + 1:
            self.cpu_budget = None
            self.stop("cpu_time")

    def feed_stdin(self) -> None:
        """Write the next piece of the program's stdin; close it once all is written."""
        try:
            written = os.write(self.stdin_fd, self.stdin[:CHUNK])
        except BlockingIOError:
            return
        except OSError:  # the program closed its stdin early
            self.close_stdin()
            return
        self.stdin = self.stdin[written:]
        if not self.stdin:
            self.close_stdin()

    def close_stdin(self) -> None:
        if self.stdin_fd >= 0:
            self.poller.unregister(self.stdin_fd)
            self.proc.close_stdin()
            self.stdin_fd = -1

    def pump_output(self, fd: int) -> None:
        """Read what the program wrote to ``fd`` and pass it on up to the cap; past it, stop."""
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return
        if not data:
            self.close_output(fd)
            return
        stream = self.names[fd]
        room = self.cap - self.sent[stream]
        if room > 0:
            # Streamed within OUTPUT_FLUSH_SECONDS of its reading: what the program printed
            # survives even if the agent does not (an OOM kill of the agent ends the container).
            chunk = data[:room]
            self.sent[stream] += len(chunk)
            self.pending.add(stream, chunk)
        if len(data) > room:
            self.truncated[stream] = True
            if "output" not in self.limits_hit:
                self.stop("output")

    def close_output(self, fd: int) -> None:
        """One of the program's output pipes closed: with both closed, it may have announced its exit."""
        self.poller.unregister(fd)
        self.outputs.discard(fd)
        if not self.outputs and not self.exited:
            self.named = named_exit(self.proc.pid)
            if self.named is not None:
                self.stop("exited")

    def finish(self, conn: _socket.socket, job: "Message") -> "Message":
        """Reap the program, tell which limits ended it, send the files it left; the result."""
        duration_ms = (time.monotonic() - self.started) * 1000
        self.close_stdin()
        if self.named is None:
            self.proc.wait()
        reap(self.proc)
        os.close(self.pidfd)
        # The announced code wins: the SIGKILL of a stop may reach the program between its naming
        # and its exit.
        returncode = self.named if self.named is not None else self.proc.returncode
        limits_hit = self.limits_hit + self.limits_seen_after(returncode)
        # Nothing of the program may run while its files are read: none can swap one for a link.
        kill_everything()
        reap(self.proc)
        if self.relays is not None:
            # Every connection ends with the run, before the result: the server's counts are final then.
            self.relays.close()
        files_truncated = send_files(conn, int(job.get("out_count") or 0), int(job.get("out_bytes") or 0))
        return {
            "type": "result",
            "exit_code": returncode,
            "stdout_truncated": self.truncated["stdout"],
            "stderr_truncated": self.truncated["stderr"],
            "limits_hit": limits_hit,
            "duration_ms": duration_ms,
            "error": None,
            "files_truncated": files_truncated,
        }

    def limits_seen_after(self, returncode: int | None) -> list[str]:
        """The limits the program's end shows it hit, beyond those the agent stopped it for."""
        seen = []
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        if "cpu_time" not in self.limits_hit and (
            returncode == -_signal.SIGXCPU
            or (
                returncode == -_signal.SIGKILL
                and self.cpu_limit
                and usage.ru_utime + usage.ru_stime - self.startup_cpu >= self.cpu_limit
            )
        ):
            seen.append("cpu_time")
        oom_after, pids_after = oom_kills(), pids_max_hits()
        if oom_after is not None and self.oom_before is not None and oom_after > self.oom_before:
            seen.append("memory")
        if pids_after is not None and self.pids_before is not None and pids_after > self.pids_before:
            seen.append("pids")
        if returncode == -_signal.SIGXFSZ or any(map(filesystem_full, (WORKDIR, "/tmp", "/dev/shm"))):
            seen.append("disk")
        return seen


def run_job(
    conn: _socket.socket, pending: PendingOutput, proc: Program, job_w: int, job: "Message"
) -> "Message":
    """Run the job's program to its end or a stop; the result to send (its output went first)."""
    run = Run(pending, proc, job)
    run.start(job_w)
    run.watch()
    return run.finish(conn, job)


# What the program leaves in /work/out comes back with the result. Everything there is hostile: it
# is read through directory descriptors, nothing is followed, and only regular files are read, at
# most the size they had when opened. Entries past these bounds, names that are not UTF-8 or
# that the server refuses (a backslash), and files of any other kind are left behind, flagged.
OUT_DIR = "out"
MAX_PATH = 1024
MAX_DEPTH = 32
MAX_ENTRIES = 10000
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class Collected:
    """What ``send_files`` has sent so far, and whether it left anything behind."""

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.count_left = max_count
        self.bytes_left = max_bytes
        self.entries_left = MAX_ENTRIES
        self.truncated = False


def send_files(conn: _socket.socket, max_count: int, max_bytes: int) -> bool:
    """Send the regular files under WORKDIR/out, in path order, within the caps; True if any was
    left behind."""
    state = Collected(max_count, max_bytes)
    try:
        work = os.open(WORKDIR, _OPEN_DIR)
    except OSError:
        return False
    try:
        send_tree(conn, work, OUT_DIR, OUT_DIR, 0, state)
    finally:
        os.close(work)
    return state.truncated


def send_tree(conn: _socket.socket, parent: int, name: str, path: str, depth: int, state: Collected) -> None:
    try:
        fd = os.open(name, _OPEN_DIR, dir_fd=parent)
    except FileNotFoundError:
        return
    except OSError:  # a symlink, something that is not a directory, or no permission
        state.truncated = True
        return
    try:
        names = []
        with os.scandir(fd) as entries:
            for entry in entries:
                if state.entries_left <= 0:
                    state.truncated = True
                    break
                state.entries_left -= 1
                names.append(entry.name)
        for child in sorted(names):
            child_path = f"{path}/{child}"
            try:
                child_path.encode()
            except UnicodeEncodeError:
                state.truncated = True
                continue
            if len(child_path) > MAX_PATH or "\\" in child:
                state.truncated = True
                continue
            try:
                st = os.stat(child, dir_fd=fd, follow_symlinks=False)
            except OSError:
                state.truncated = True
                continue
            if stat.S_ISDIR(st.st_mode) and depth < MAX_DEPTH:
                send_tree(conn, fd, child, child_path, depth + 1, state)
            elif stat.S_ISREG(st.st_mode):
                send_file(conn, fd, child, child_path, state)
            else:
                state.truncated = True
    finally:
        os.close(fd)


def send_file(conn: _socket.socket, parent: int, name: str, path: str, state: Collected) -> None:
    if state.count_left <= 0:
        state.truncated = True
        return
    try:
        fd = os.open(name, _OPEN_FILE, dir_fd=parent)
    except OSError:
        state.truncated = True
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > state.bytes_left:
            state.truncated = True
            return
        state.count_left -= 1
        left = st.st_size
        while True:
            data = os.read(fd, min(CHUNK, left)) if left else b""
            left -= len(data)
            state.bytes_left -= len(data)
            end = not data or not left
            send_frame(conn, {"type": "file", "path": path, "data": b64(data), "end": end})
            if end:
                return
    except OSError:
        state.truncated = True
    finally:
        os.close(fd)


def listen() -> _socket.socket:
    # Bind and listen under a temporary name, then rename: the server connects as soon as the
    # path exists, so it must never see a socket that is not listening yet.
    staging = SOCKET_PATH + ".new"
    for path in (staging, SOCKET_PATH):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    server = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    server.bind(staging)
    os.chmod(staging, 0o600)
    server.listen(1)
    os.rename(staging, SOCKET_PATH)
    fd, _ = server._accept()  # type: ignore[attr-defined]  # socket.accept's C half, not in typeshed
    conn = _socket.socket(fileno=fd)
    # One connection ever: nobody else may reach this agent once the server has it.
    server.close()
    os.unlink(SOCKET_PATH)
    return conn


def main() -> None:
    _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)
    # Inherited by the interpreter: a crash must not leave a core file in the small tmpfs.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # The server lowers this agent's OOM score from the host once it connects (sandbox.connect).
    global LANDLOCK_ABI
    LANDLOCK_ABI = landlock_abi()
    proc, job_w, ready_r = spawn_interpreter()
    failed = wait_ready(ready_r, proc)
    conn = listen()
    send_frame(
        conn,
        {
            "type": "hello",
            "version": PROTOCOL_VERSION,
            "pid": proc.pid,
            "landlock": LANDLOCK_ABI,
            "preload_failed": failed[:64],
            "memory": memory_in_use(),
        },
    )
    job = recv_frame(conn)
    if job.get("type") != "job":
        raise ValueError(f"expected a job frame, got {job.get('type')!r}")
    pending = PendingOutput(conn)
    try:
        result = run_job(conn, pending, proc, job_w, job)
    except Exception as exc:
        kill_everything()
        # What the program printed before the failure still goes ahead of the error.
        try:
            pending.flush()
        except OSError:
            pass
        result = {"type": "error", "message": f"agent failed: {exc!r}"}
    send_frame(conn, result)
    # Exit at once, without the interpreter's teardown: the server waits for this hang-up before
    # it removes the container, and Podman removes a container it finds stopped without a kill,
    # a state query and a wait for the exit (two of the five runtime processes a container cost).
    os._exit(0)


if __name__ == "__main__":
    main()
