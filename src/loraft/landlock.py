"""Kernel confinement of this process's file-system access with Linux Landlock, through ctypes syscalls.

`loraft ui` calls `restrict` once at start, before any thread exists: from then on the UI and every process it
launches (training runs, jobs) can read and write only beneath the paths it named. The kernel checks the final
file at every open, so a symlink in the workspace that is swapped to point outside after the UI checked it still
leads nowhere: there is no window between the check and the use.

Only the file system is confined. Network, IPC scopes and device ioctls (LANDLOCK_ACCESS_FS_IOCTL_DEV, ABI 5: GPU
drivers ioctl /dev/nvidia*) are left as they are. On ABI 1 the kernel has no REFER right, so it denies every
rename or link into another directory (EXDEV), even between writable folders; a rename within one directory
(an atomic write) works on every ABI.

This module imports nothing from loraft.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import stat
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

# The generic syscall table (x86_64, aarch64 and every architecture since Linux 5.1's unified numbering, except
# alpha, which adds 110).
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# LANDLOCK_ACCESS_FS_* (include/uapi/linux/landlock.h).
_EXECUTE = 1 << 0
_WRITE_FILE = 1 << 1
_READ_FILE = 1 << 2
_READ_DIR = 1 << 3
_REMOVE_DIR = 1 << 4
_REMOVE_FILE = 1 << 5
_MAKE_CHAR = 1 << 6
_MAKE_DIR = 1 << 7
_MAKE_REG = 1 << 8
_MAKE_SOCK = 1 << 9
_MAKE_FIFO = 1 << 10
_MAKE_BLOCK = 1 << 11
_MAKE_SYM = 1 << 12
_REFER = 1 << 13  # ABI 2
_TRUNCATE = 1 << 14  # ABI 3

_READ_ACCESS = _EXECUTE | _READ_FILE | _READ_DIR
# Device nodes (MAKE_CHAR, MAKE_BLOCK) are handled but granted nowhere.
_WRITE_ACCESS = (_READ_ACCESS | _WRITE_FILE | _TRUNCATE | _REMOVE_DIR | _REMOVE_FILE | _MAKE_DIR | _MAKE_REG
                 | _MAKE_SYM | _MAKE_FIFO | _MAKE_SOCK | _REFER)
# The only rights a rule on a non-directory may carry; any other bit makes landlock_add_rule fail with EINVAL.
_FILE_ACCESS = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE


class _RulesetAttr(ctypes.Structure):
    # Only the first field of struct landlock_ruleset_attr (size 8), so every ABI accepts it and no network or
    # scope restriction is switched on.
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # struct landlock_path_beneath_attr is __attribute__((packed)): 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _syscall(number: int, *args) -> int:
    """The syscall's result; OSError with its errno where it returns -1."""
    result = _libc().syscall(ctypes.c_long(number), *args)
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return result


def available() -> Optional[int]:
    """The Landlock ABI version this kernel offers, or None where there is none (not Linux, a kernel without
    Landlock or with it switched off, the syscall blocked by seccomp). Never raises."""
    if not sys.platform.startswith("linux") or platform.machine().startswith("alpha"):
        return None
    try:
        version = _syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except (OSError, AttributeError):  # ENOSYS, EOPNOTSUPP, EPERM...; AttributeError: a libc without syscall()
        return None
    return version if version >= 1 else None


def _handled_access(abi: int) -> int:
    """The file-system rights `restrict` hands to the kernel on Landlock ABI `abi`: denied wherever no rule
    grants them. A right the running ABI does not know would make the kernel refuse the whole ruleset (EINVAL)."""
    access = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        access |= _REFER
    if abi >= 3:
        access |= _TRUNCATE
    return access


def _count_threads() -> int:
    # /proc/self/task also shows native threads (an OpenMP pool, a C extension's worker) that threading cannot see.
    try:
        native = len(os.listdir("/proc/self/task"))
    except OSError:
        native = 1
    return max(threading.active_count(), native)


def _add_path_rule(ruleset_fd: int, path: PathLike, allowed: int) -> None:
    try:
        path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return  # a path that does not exist grants nothing
    except OSError as error:
        raise OSError(error.errno, f"Landlock confinement could not open {os.fspath(path)!r}: "
                                   f"{os.strerror(error.errno)}") from None
    try:
        if not stat.S_ISDIR(os.fstat(path_fd).st_mode):
            allowed &= _FILE_ACCESS
        rule = _PathBeneathAttr(allowed_access=allowed, parent_fd=path_fd)
        _syscall(_SYS_ADD_RULE, ctypes.c_int(ruleset_fd), ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(rule),
                 ctypes.c_uint32(0))
    except OSError as error:
        raise OSError(error.errno, f"Landlock refused the rule for {os.fspath(path)!r} "
                                   f"(landlock_add_rule: {os.strerror(error.errno)})") from None
    finally:
        os.close(path_fd)


def restrict(read: Sequence[PathLike], write: Sequence[PathLike]) -> Optional[int]:
    """Confine this process, and every thread and process it starts later, to the given paths. Cannot be undone.

    Beneath each `read` path: read files, list directories, execute. Beneath each `write` path also: write,
    truncate, create regular files, directories, symlinks, fifos and sockets, remove files and directories, and
    rename or link between writable folders (ABI >= 2). Everything else on the file system is denied. A path that
    does not exist is skipped; a regular file gets only the file rights (read/execute, or also write/truncate).

    Returns:
        The Landlock ABI version used, or None where Landlock is unavailable: then nothing is restricted.
    Raises:
        RuntimeError: another thread is running (Landlock would leave it unconfined), a bug in the caller.
        OSError: the kernel refused a rule or the restriction after Landlock was found available: a process
            confined only halfway would be worse than one that stops.
    """
    threads = _count_threads()
    if threads > 1:
        raise RuntimeError(f"landlock.restrict() must run before any other thread starts, because Landlock "
                           f"confines only the calling thread and what it starts later; this process already has "
                           f"{threads} threads.")
    abi = available()
    if abi is None:
        return None
    handled = _handled_access(abi)
    if _libc().prctl(ctypes.c_int(_PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                     ctypes.c_ulong(0)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"Landlock confinement could not set no_new_privs: {os.strerror(error)}")
    attr = _RulesetAttr(handled_access_fs=handled)
    try:
        ruleset_fd = _syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
                              ctypes.c_uint32(0))
    except OSError as error:
        raise OSError(error.errno, f"Landlock refused the ruleset (landlock_create_ruleset: "
                                   f"{os.strerror(error.errno)})") from None
    try:
        for path in read:
            _add_path_rule(ruleset_fd, path, _READ_ACCESS & handled)
        for path in write:
            _add_path_rule(ruleset_fd, path, _WRITE_ACCESS & handled)
        try:
            _syscall(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset_fd), ctypes.c_uint32(0))
        except OSError as error:
            raise OSError(error.errno, f"Landlock refused to confine this process (landlock_restrict_self: "
                                       f"{os.strerror(error.errno)})") from None
    finally:
        os.close(ruleset_fd)
    return abi


def system_read_roots() -> list[Path]:
    """What any Python process (and any process loraft starts) needs to read to run, resolved and deduplicated.

    Never the current working directory: `python -m` puts it first on sys.path, and granting it that way would
    open whatever folder the user happened to start from.
    """
    try:
        cwd: Optional[Path] = Path.cwd().resolve()
    except OSError:  # a removed working directory
        cwd = None
    # The venv (site-packages, pyvenv.cfg), the base interpreter (stdlib, lib-dynload) and the real interpreter
    # binary a child process executes (a venv's python is a symlink, maybe to a folder outside every prefix).
    candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  os.path.dirname(os.path.realpath(sys.executable))]
    # .pth and PYTHONPATH folders (an editable install's src); '' (the cwd under -c) is not absolute, so skipped.
    candidates += [entry for entry in sys.path
                   if os.path.isabs(entry) and os.path.isdir(entry) and Path(entry).resolve() != cwd]
    # The folder loraft is imported from: an editable install's import hook puts it on no sys.path entry, and the
    # runs the UI launches import loraft from there.
    candidates.append(str(Path(__file__).resolve().parents[1]))
    # Shared libraries, the dynamic loader and the tools children run (/usr, /lib*, /bin, /sbin); ld.so.cache,
    # passwd, certificates, time zones (/etc); cpu counts, /proc/self/fd for subprocess, device topology (/proc,
    # /sys); /dev/null and /dev/urandom (/dev; writing there is the caller's choice); the target of
    # /etc/resolv.conf and driver sockets (/run); every file of a NixOS system (/nix/store); software installed
    # outside the package manager (/opt: CUDA, conda, the wheel and index folders a pip.conf under /etc names).
    candidates += ["/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/etc", "/proc", "/sys", "/dev",
                   "/run", "/nix/store", "/opt"]
    roots: list[Path] = []
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            root = Path(candidate).resolve()
            if root not in roots:
                roots.append(root)
    return roots
