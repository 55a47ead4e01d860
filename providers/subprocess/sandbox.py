"""A subprocess plugin, locked down: the command line that launches it inside its sandbox.

Layers, outermost first, each applied even when the next is missing:

    prlimit     RLIMIT_CPU (capabilities.cpu_s), RLIMIT_AS (memory_mb), RLIMIT_NOFILE
    setpriv     as root: a uid (and gid) claimed for the plugin alone
                (``providers.subprocess.uids``), or ``sandbox.user``; no groups: the
                kernel never applies RLIMIT_NPROC to root, and a plugin needs no root;
                without bubblewrap, also no_new_privs
    bwrap       new user, PID, IPC, UTS, cgroup and network namespaces (the network is
                shared only when capabilities.network grants some), and no user namespace
                of the plugin's own inside them (bubblewrap 0.8); a read-only view of
                /usr, the executable's folder and ``sandbox.runtime``; the socket folder
                read-write (the only way out: the host dials the socket it checked,
                pinned, never a name the plugin can change, ``handshake.pin_socket``);
                the granted files; a private /tmp of ``sandbox.tmp_mb`` (bubblewrap
                0.8), /proc, /dev; no_new_privs; dies with the dispatcher
    prlimit     inside the plugin's user namespace: RLIMIT_NPROC (pids; threads count
                too), which there counts the plugin's own processes, not its uid's
                (without bubblewrap it is set with the other limits, and counts the uid's)
    seccomp     a BPF program (libseccomp through ``pyseccomp``) that kills the plugin
                on ptrace, mount (and the new mount API), bpf, keyctl, kernel modules,
                kexec, reboot, …, and on namespaces made by clone(2) as by unshare(2);
                clone3(2), whose flags a filter cannot read, answers ENOSYS (C libraries
                fall back to clone); so does io_uring, whose work a filter does not see

Whose processes a process limit counts: RLIMIT_NPROC is checked against the processes
and threads of the real uid in the forking process's user namespace, then, level by level,
in each namespace above it, there against the limit the namespace's creator had. Set
before bwrap, as it was, it counted every process of the uid on the host: with every
plugin running as 65534, one holding its limit kept every other plugin from starting or
restarting ("bwrap: Creating new namespace failed"), and a dispatcher not running as root
(its plugins run as its uid) with more threads than a plugin's limit could not start it.
Set inside, each plugin counts its own; the levels above are held to the dispatcher's own
limit (``ulimit -u``), which bounds the dispatcher's threads and its plugins' together.
The uid of its own adds what a namespace does not: the kernel's other per-user limits
(inotify instances, 128 by default, pending signals, message queues, pipe buffers) are
counted per uid on the whole host.

What cannot be enforced here (no bwrap, no libseccomp, network limited to some hosts,
which a namespace cannot express, per-user limits shared with the dispatcher when it does
not run as root) is listed in ``Translation.unenforced``: the provider warns at attach time
and ``dispatcher inspect`` prints it.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from providers.capabilities import Capabilities, Translation
from providers.subprocess.target import SubprocessSandbox
from providers.subprocess.uids import PLUGIN_UIDS

__all__ = [
    "DENIED_SYSCALLS",
    "SandboxedLaunch",
    "needs_own_uid",
    "sandboxed_launch",
    "seccomp_program",
]

#: What a plugin never needs and an escape often does.
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root",
    "chroot", "bpf", "keyctl", "add_key", "request_key", "init_module", "finit_module",
    "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff",
    "unshare", "setns", "perf_event_open", "userfaultfd", "open_by_handle_at",
    "acct", "settimeofday", "clock_settime", "syslog",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
)  # fmt: skip

#: clone(2) flags that make namespaces: what unshare(2) would, by the other door (a user
#: namespace of the plugin's own gives it every capability in there, and the kernel's
#: code for namespaces and netfilter to aim at).
_NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)


#: What the kernel counts per user, host-wide, for the plugins that share a uid.
_PER_USER_LIMITS = (
    "the kernel's per-user limits (inotify instances and watches, pending signals, "
    "message queues, pipe buffers)"
)

#: Answered ENOSYS, as a kernel without them would: io_uring runs work in kernel threads
#: that a seccomp filter does not see (Docker's default profile refuses it too), and the
#: runtimes that use it (libuv, for Node's files) fall back to plain calls on ENOSYS.
_UNAVAILABLE = ("io_uring_setup", "io_uring_enter", "io_uring_register")


@dataclass
class SandboxedLaunch:
    """The argv to spawn, the descriptors it inherits, and what it enforces."""

    argv: list[str]
    translation: Translation
    pass_fds: tuple[int, ...] = ()
    run_as: tuple[int, int] | None = None
    _files: list[IO[bytes]] = field(default_factory=list)

    def close(self) -> None:
        """Close our copies of the inherited descriptors (after the spawn)."""
        for file in self._files:
            file.close()
        self._files.clear()


def seccomp_program() -> IO[bytes] | None:
    """The seccomp BPF program in an unlinked file, or None without libseccomp."""
    try:
        import pyseccomp
    except (ImportError, OSError):
        return None
    rules = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        rules.add_rule(pyseccomp.KILL_PROCESS, name)
    for flag in _NAMESPACE_FLAGS:  # the flags are clone's first argument on x86-64 and arm64
        rules.add_rule(
            pyseccomp.KILL_PROCESS, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag)
        )
    rules.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    for name in _UNAVAILABLE:
        rules.add_rule(pyseccomp.ERRNO(errno.ENOSYS), name)
    # Outlives this function: the child inherits its descriptor; SandboxedLaunch.close ends it.
    program = tempfile.TemporaryFile()  # noqa: SIM115
    rules.export_bpf(program)
    program.seek(0)
    return program


def _counts_per_user_namespace() -> bool:
    """Whether RLIMIT_NPROC counts a uid's processes per user namespace (Linux 5.14)."""
    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return found is not None and (int(found[1]), int(found[2])) >= (5, 14)


@functools.cache
def _bwrap_options(bwrap: str) -> frozenset[str]:
    """The options ``bwrap --help`` lists (``--size`` and ``--disable-userns`` are 0.8's)."""
    try:
        shown = subprocess.run(
            [bwrap, "--help"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(word for word in shown.stdout.split() if word.startswith("--"))


def needs_own_uid(sandbox: SubprocessSandbox) -> bool:
    """Whether a launch with ``sandbox`` runs as a uid claimed for the plugin alone
    (``providers.subprocess.uids``): as root, with setpriv, and no ``sandbox.user``."""
    return os.geteuid() == 0 and sandbox.user is None and shutil.which("setpriv") is not None


def sandboxed_launch(
    argv: list[str],
    sandbox: SubprocessSandbox,
    capabilities: Capabilities,
    socket_folder: str,
    *,
    own_uid: int | None = None,
    own_uid_failure: str | None = None,
) -> SandboxedLaunch:
    """The launch of ``argv`` in its sandbox.

    ``own_uid``: the uid claimed for this plugin when ``needs_own_uid``; ``own_uid_failure``
    why none could be (the plugin then runs as 65534, reported). With neither, the launch
    only describes what a launch would do (``dispatcher inspect``), uid claimed at launch.
    """
    translation = Translation("subprocess")
    enforced, unenforced = translation.enforced, translation.unenforced
    command: list[str] = []
    prlimit = shutil.which("prlimit")
    setpriv = shutil.which("setpriv")
    bwrap = shutil.which("bwrap")

    nproc = f"--nproc={capabilities.pids or sandbox.processes}"
    limits = [f"--nofile={sandbox.open_files}"]
    if capabilities.cpu_s is not None:
        limits.append(f"--cpu={math.ceil(capabilities.cpu_s)}")
    if capabilities.memory_mb is not None:
        limits.append(f"--as={capabilities.memory_mb * 1024 * 1024}")
    # RLIMIT_NPROC goes inside the plugin's user namespace, where it counts the plugin's
    # own processes; before bwrap it counted the uid's on the whole host (the module's
    # docstring says what that did).
    inner_nproc = bwrap is not None and prlimit is not None
    if prlimit is not None:
        command += [prlimit, *limits] if inner_nproc else [prlimit, nproc, *limits]
        command.append("--")
        shown = [limits[0], nproc, *limits[1:]]
        enforced.append("limits: " + " ".join(limit.lstrip("-") for limit in shown))
    else:
        unenforced.append("limits: prlimit (util-linux) is missing; no resource limit applies")

    run_as = None
    shared_user = ""
    if os.geteuid() == 0:
        if setpriv is None:
            unenforced.append("user: setpriv is missing: the plugin runs as root (pids unlimited)")
        else:
            if sandbox.user is not None:
                uid, gid = (int(part) for part in sandbox.user.split(":"))
                enforced.append(f"user: {uid}:{gid} (sandbox.user)")
                shared_user = f"uid {uid} (sandbox.user)"
            elif own_uid is not None:
                uid = gid = own_uid
                enforced.append(f"user: {uid}:{gid}, a uid of its own")
            else:
                uid = gid = 65534
                if own_uid_failure is not None:
                    unenforced.append(
                        f"user: no uid of its own ({own_uid_failure}): runs as 65534:65534, "
                        f"sharing {_PER_USER_LIMITS} with every plugin that runs as it"
                    )
                    shared_user = "uid 65534"
                else:
                    enforced.append(
                        f"user: a uid of its own, claimed at launch from {PLUGIN_UIDS.start}-"
                        f"{PLUGIN_UIDS.stop - 1}"
                    )
            run_as = (uid, gid)
            command += [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
            if bwrap is None:
                command.append("--no-new-privs")
            command.append("--")
    else:
        uid = os.getuid()
        unenforced.append(
            f"user: the dispatcher does not run as root: the plugin runs as its uid {uid}, "
            f"sharing {_PER_USER_LIMITS} with the dispatcher and its other plugins"
        )
        shared_user = f"uid {uid}, the dispatcher's"

    files: list[IO[bytes]] = []
    pass_fds: tuple[int, ...] = ()
    if bwrap is None:
        unenforced.append(
            "namespaces: bubblewrap (bwrap) is not installed: no private network, file view, "
            "/tmp or PID namespace; only the limits above apply"
        )
        if prlimit is not None and shared_user:
            unenforced.append(
                f"limits: {nproc.lstrip('-')} counts every process and thread of {shared_user}, "
                "not the plugin's alone (without bubblewrap it has no user namespace of its own)"
            )
        if sandbox.seccomp:
            unenforced.append("seccomp: needs bubblewrap to load the filter")
        return SandboxedLaunch([*command, *argv], translation, (), run_as)

    executable = Path(argv[0])
    options = _bwrap_options(bwrap)
    view = ["--unshare-all", "--die-with-parent", "--new-session"]
    if "--disable-userns" in options:
        # --unshare-all only tries for a user namespace; --disable-userns needs one.
        view += ["--unshare-user", "--disable-userns"]
    else:
        unenforced.append(
            "namespaces: this bubblewrap cannot keep the plugin from making user namespaces "
            "of its own (--disable-userns is bubblewrap 0.8's)"
        )
    # A tmpfs is memory the plugin's RLIMIT_AS does not count: unbounded, it was half the
    # host's RAM for any plugin to fill.
    if "--size" in options:
        view += ["--size", str(sandbox.tmp_mb * 1024 * 1024)]
    else:
        unenforced.append(
            f"files: /tmp is not limited to {sandbox.tmp_mb} MiB (--size is bubblewrap 0.8's)"
        )
    view += [
        "--tmpfs", "/tmp",
        "--ro-bind", "/usr", "/usr",
        "--proc", "/proc", "--dev", "/dev",
    ]  # fmt: skip
    for link in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{link}"):
            view += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
    own = executable.parent
    view += ["--ro-bind", str(own), str(own)]
    for path in sandbox.runtime:
        view += ["--ro-bind", str(path), str(path)]
    for grant in capabilities.files:
        view += ["--bind" if grant.mode == "rw" else "--ro-bind", str(grant.path), str(grant.path)]
    view += ["--bind", socket_folder, socket_folder, "--chdir", str(own)]
    enforced.append(
        "namespaces: user, pid, ipc, uts, cgroup"
        + (", network" if not capabilities.has_network else "")
        + ("; none of the plugin's own" if "--disable-userns" in options else "")
        + "; no_new_privs; dies with the dispatcher"
    )
    enforced.append(
        "files: read-only /usr, "
        + ", ".join(str(path) for path in [own, *sandbox.runtime])
        + "".join(f", {grant.path} ({grant.mode})" for grant in capabilities.files)
        + f"; private /tmp ({sandbox.tmp_mb} MiB); the socket folder"
    )
    if capabilities.has_network:
        view.append("--share-net")
        unenforced.append(
            f"network: limited to {', '.join(capabilities.network)} is not enforced: "
            "bubblewrap shares the host's whole network or none"
        )
    else:
        enforced.append("network: none (own network namespace; the Unix socket is the way out)")

    if sandbox.seccomp:
        program = seccomp_program()
        if program is None:
            unenforced.append("seccomp: libseccomp/pyseccomp unavailable: syscalls not filtered")
        else:
            files.append(program)
            pass_fds = (program.fileno(),)
            view += ["--seccomp", str(program.fileno())]
            enforced.append(
                "seccomp: kills the plugin on " + ", ".join(DENIED_SYSCALLS[:6]) + ", …"
            )
    inside: list[str] = []
    if inner_nproc:
        assert prlimit is not None
        if not os.path.realpath(prlimit).startswith("/usr/"):
            view += ["--ro-bind", prlimit, prlimit]  # outside the /usr the plugin is shown
        inside = [prlimit, nproc, "--"]
        if "--unshare-user" in view and _counts_per_user_namespace():
            enforced.append(
                f"processes: {nproc.lstrip('-')} counts the plugin's own processes and "
                "threads (set inside its user namespace)"
            )
        elif shared_user:
            unenforced.append(
                f"limits: {nproc.lstrip('-')} counts every process and thread of "
                f"{shared_user}, not the plugin's alone (a user namespace counts its own "
                "from Linux 5.14, and the plugin has one of its own with bubblewrap 0.8)"
            )
    return SandboxedLaunch(
        [*command, bwrap, *view, "--", *inside, *argv], translation, pass_fds, run_as, files
    )
