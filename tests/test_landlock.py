"""Landlock confinement (loraft.landlock) against the real kernel.

Each case confines a fresh `python -c` process, because confinement cannot be undone, and reports what each
file operation did as JSON ("ok" or the exception's class name), so a failure shows every outcome at once.
Three folders under tmp_path: A (granted read-only), B (granted writable), C (not granted).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loraft import landlock

pytestmark = pytest.mark.skipif(landlock.available() is None,
                                reason="this kernel offers no Landlock (not Linux, too old, switched off or "
                                       "blocked by seccomp), so there is nothing to confine with")

PROLOGUE = """
import json, os, subprocess, sys, threading
from pathlib import Path
from loraft import landlock
A, B, C = (Path(arg) for arg in sys.argv[1:4])
outcomes = {}

def attempt(name, action):
    try:
        action()
    except Exception as error:
        outcomes[name] = type(error).__name__
    else:
        outcomes[name] = "ok"
"""

# The confinement loraft ui applies, with A as the workspace part one may only read and B the writable part.
CONFINE = "ABI = landlock.restrict(read=landlock.system_read_roots() + [A], write=[B])\n"


@pytest.fixture
def folders(tmp_path):
    for name in "ABC":
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name.lower()}.txt").write_text(f"in {name}")
    return tmp_path / "A", tmp_path / "B", tmp_path / "C"


def confined(body: str, folders, confine=True, env=None, extra_args=()) -> dict:
    """Run PROLOGUE (+ CONFINE) + body in a fresh Python process (cwd: C; argv: A, B, C, *extra_args) and return
    the `outcomes` it printed."""
    code = PROLOGUE + (CONFINE if confine else "") + textwrap.dedent(body) + "\nprint(json.dumps(outcomes))\n"
    completed = subprocess.run([sys.executable, "-c", code, *map(str, folders), *extra_args], capture_output=True,
                               text=True, cwd=folders[2], env=env, timeout=120)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.splitlines()[-1])


def test_reads_only_beneath_read_roots(folders):
    # cwd is C and `python -c` puts '' (the cwd) on sys.path: C must still be closed.
    outcomes = confined("""
        outcomes["abi"] = ABI
        attempt("read A", lambda: (A / "a.txt").read_text())
        attempt("list A", lambda: os.listdir(A))
        attempt("read C", lambda: (C / "c.txt").read_text())
        attempt("list C", lambda: os.listdir(C))
        attempt("list cwd", lambda: os.listdir("."))
    """, folders)
    assert outcomes == {"abi": landlock.available(), "read A": "ok", "list A": "ok", "read C": "PermissionError",
                        "list C": "PermissionError", "list cwd": "PermissionError"}


def test_symlink_swapped_after_the_check_leads_nowhere(folders):
    """The link is checked (points into A), then swapped by an unconfined process to point into C: the kernel
    checks the final file at open, so the swapped link cannot be read through."""
    folder_a, _, folder_c = folders
    link = folder_a / "link.txt"
    link.symlink_to(folder_a / "a.txt")
    process = subprocess.Popen([sys.executable, "-c", PROLOGUE + CONFINE + textwrap.dedent("""
        attempt("read link before swap", lambda: (A / "link.txt").read_text())
        print("checked", flush=True)
        sys.stdin.readline()
        attempt("read link after swap", lambda: (A / "link.txt").read_text())
        attempt("resolve link", lambda: (A / "link.txt").resolve(strict=True))
        print(json.dumps(outcomes))
    """), *map(str, folders)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "checked\n", process.stderr.read()
        link.unlink()
        link.symlink_to(folder_c / "c.txt")
        stdout, stderr = process.communicate("go\n", timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    # Resolving a path only reads links (not confined); opening the target is what the kernel stops.
    assert json.loads(stdout) == {"read link before swap": "ok", "read link after swap": "PermissionError",
                                  "resolve link": "ok"}


def test_writes_only_beneath_write_roots(folders):
    outcomes = confined("""
        def atomic_write():  # loraft's write_text_atomically: a temporary name, then os.replace over the target
            (B / ".b.txt.tmp").write_text("new")
            os.replace(B / ".b.txt.tmp", B / "b.txt")
            assert (B / "b.txt").read_text() == "new"

        def truncate():  # both ways: open(..., "w") (O_TRUNC) and truncate(2)
            (B / "b.txt").write_text("newer")
            os.truncate(B / "b.txt", 1)
            assert (B / "b.txt").read_text() == "n"

        attempt("write new file in A", lambda: (A / "new.txt").write_text("x"))
        attempt("overwrite file in A", lambda: (A / "a.txt").write_text("x"))
        attempt("remove file in A", lambda: (A / "a.txt").unlink())
        attempt("write new file in B", lambda: (B / "new.txt").write_text("x"))
        attempt("atomic write in B", atomic_write)
        attempt("truncate in B", truncate)
        attempt("mkdir in B", lambda: (B / "sub").mkdir())
        attempt("move into subfolder of B", lambda: os.replace(B / "new.txt", B / "sub" / "new.txt"))
        attempt("rmdir in B", lambda: (os.remove(B / "sub" / "new.txt"), (B / "sub").rmdir()))
        attempt("symlink in B", lambda: (B / "link").symlink_to(C / "c.txt"))
        attempt("read C through own symlink", lambda: (B / "link").read_text())
        attempt("replace from B into A", lambda: os.replace(B / "b.txt", A / "b.txt"))
        attempt("write new file in C", lambda: (C / "new.txt").write_text("x"))
    """, folders)
    assert outcomes == {"write new file in A": "PermissionError", "overwrite file in A": "PermissionError",
                        "remove file in A": "PermissionError", "write new file in B": "ok",
                        "atomic write in B": "ok", "truncate in B": "ok", "mkdir in B": "ok",
                        "move into subfolder of B": "ok", "rmdir in B": "ok", "symlink in B": "ok",
                        "read C through own symlink": "PermissionError",
                        "replace from B into A": "PermissionError", "write new file in C": "PermissionError"}
    folder_a, folder_b, folder_c = folders
    assert sorted(path.name for path in folder_a.iterdir()) == ["a.txt"]
    assert (folder_a / "a.txt").read_text() == "in A" and (folder_b / "b.txt").read_text() == "n"
    assert sorted(path.name for path in folder_c.iterdir()) == ["c.txt"]


def test_child_process_is_confined_and_runs_python(folders):
    """system_read_roots() suffices to start Python (stdlib imports included) in a process the confined one starts,
    and that process inherits the confinement."""
    child_code = PROLOGUE + textwrap.dedent("""
        attempt("read A", lambda: (A / "a.txt").read_text())
        attempt("read C", lambda: (C / "c.txt").read_text())
        outcomes["json"] = json.loads("[1]")
        print(json.dumps(outcomes))
    """)
    outcomes = confined("""
        child = subprocess.run([sys.executable, "-c", sys.argv[4], *sys.argv[1:4]], capture_output=True, text=True)
        outcomes["child exit"] = child.returncode
        outcomes["child"] = json.loads(child.stdout) if child.returncode == 0 else child.stderr
    """, folders, extra_args=[child_code])
    assert outcomes == {"child exit": 0, "child": {"read A": "ok", "read C": "PermissionError", "json": [1]}}


def test_torch_runs_confined(folders):
    """A realistic check that the read roots suffice for the libraries loraft uses. Importing torch needs a
    writable temporary folder (dill, which torch imports, calls tempfile.gettempdir()), so TMPDIR points into B,
    as loraft ui must point it into a folder it grants."""
    env = dict(os.environ, TMPDIR=str(folders[1]))
    outcomes = confined("""
        landlock.restrict(read=landlock.system_read_roots() + [A], write=[B, "/dev"])
        import torch
        outcomes["dot"] = float(torch.ones(2) @ torch.ones(2))
        attempt("read C", lambda: (C / "c.txt").read_text())
    """, folders, confine=False, env=env)
    assert outcomes == {"dot": 2.0, "read C": "PermissionError"}


def test_refuses_while_another_thread_runs(folders):
    """Landlock confines only the calling thread, so a second thread would stay free: restrict must refuse
    before confining anything."""
    outcomes = confined("""
        release = threading.Event()
        waiting = threading.Thread(target=release.wait)
        waiting.start()
        try:
            landlock.restrict(read=landlock.system_read_roots() + [A], write=[B])
        except RuntimeError as error:
            outcomes["error"] = str(error)
        release.set()
        waiting.join()
        attempt("read C", lambda: (C / "c.txt").read_text())
    """, folders, confine=False)
    assert outcomes == {"error": "landlock.restrict() must run before any other thread starts, because Landlock "
                                 "confines only the calling thread and what it starts later; this process already "
                                 "has 2 threads.",
                        "read C": "ok"}


def test_file_rules_and_missing_paths(folders):
    """A regular file as a root gets only file rights (the kernel rejects directory rights on it with EINVAL);
    a path that does not exist is skipped."""
    outcomes = confined("""
        (C / "other.txt").write_text("other")
        landlock.restrict(read=landlock.system_read_roots() + [C / "c.txt", A / "missing", A / "a.txt" / "under"],
                          write=[B / "b.txt", B / "missing"])
        attempt("read granted file in C", lambda: (C / "c.txt").read_text())
        attempt("read other file in C", lambda: (C / "other.txt").read_text())
        attempt("list C", lambda: os.listdir(C))
        attempt("read A (not granted here)", lambda: (A / "a.txt").read_text())
        attempt("overwrite granted file in B", lambda: (B / "b.txt").write_text("x"))
        attempt("write new file in B", lambda: (B / "new.txt").write_text("x"))
    """, folders, confine=False)
    assert outcomes == {"read granted file in C": "ok", "read other file in C": "PermissionError",
                        "list C": "PermissionError", "read A (not granted here)": "PermissionError",
                        "overwrite granted file in B": "ok", "write new file in B": "PermissionError"}


def test_refused_rule_raises_naming_the_path(folders):
    """A rule the kernel refuses (here a directory right on a file: EINVAL) stops with the path named, rather than
    leaving the process confined by half a ruleset."""
    outcomes = confined("""
        landlock._FILE_ACCESS |= 1 << 3  # READ_DIR, which the kernel rejects on a file
        try:
            landlock.restrict(read=[A, C / "c.txt"], write=[B])
        except OSError as error:
            outcomes["error"] = str(error)
        attempt("read C", lambda: (C / "c.txt").read_text())
    """, folders, confine=False)
    assert outcomes == {"error": f"[Errno {errno.EINVAL}] Landlock refused the rule for "
                                 f"{str(folders[2] / 'c.txt')!r} (landlock_add_rule: Invalid argument)",
                        "read C": "ok"}


def test_abi_1_confines_but_denies_reparenting(folders):
    """The branch of a kernel with ABI 1 (no REFER): confinement holds, a rename within a folder works, a move into
    another folder is denied even between writable ones (EXDEV)."""
    outcomes = confined("""
        landlock.available = lambda: 1
        outcomes["abi"] = landlock.restrict(read=landlock.system_read_roots() + [A], write=[B])
        (B / "sub").mkdir()
        attempt("read C", lambda: (C / "c.txt").read_text())
        attempt("rename within B", lambda: os.replace(B / "b.txt", B / "renamed.txt"))
        try:
            os.replace(B / "renamed.txt", B / "sub" / "renamed.txt")
            outcomes["move into subfolder of B"] = "ok"
        except OSError as error:
            outcomes["move into subfolder of B"] = error.errno
    """, folders, confine=False)
    assert outcomes == {"abi": 1, "read C": "PermissionError", "rename within B": "ok",
                        "move into subfolder of B": errno.EXDEV}


def test_restricts_nothing_without_landlock(folders):
    outcomes = confined("""
        landlock.available = lambda: None
        outcomes["abi"] = landlock.restrict(read=[A], write=[B])
        attempt("read C", lambda: (C / "c.txt").read_text())
        attempt("write C", lambda: (C / "new.txt").write_text("x"))
    """, folders, confine=False)
    assert outcomes == {"abi": None, "read C": "ok", "write C": "ok"}


def test_available_is_none_when_the_syscall_fails(monkeypatch):
    """ENOSYS (old kernel), EOPNOTSUPP (switched off at boot), EPERM (seccomp): no Landlock, no exception."""
    for code in (errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        def failing(number, *args, code=code):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(landlock, "_syscall", failing)
        assert landlock.available() is None


def test_system_read_roots_never_grant_the_working_directory(tmp_path, monkeypatch):
    """`python -m` puts the absolute cwd first on sys.path; it must not become a read root."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    roots = landlock.system_read_roots()
    assert tmp_path.resolve() not in roots
    assert len(roots) == len(set(roots))
    assert all(root.is_absolute() and root.exists() for root in roots)
    for needed in (sys.prefix, sys.base_prefix, Path(os.path.realpath(sys.executable)).parent, "/usr", "/etc"):
        assert Path(needed).resolve() in roots
