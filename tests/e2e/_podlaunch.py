"""Start one container of a pod: run as root inside fresh mount, UTS and PID namespaces.

`python _podlaunch.py PLAN.json` (see `_executor.PodExecutor`) unshares mount, UTS and PID
namespaces, forks the container's PID 1, which builds the container's filesystem view and then
becomes the container's command, and waits for it (the container's exit code or signal is written
to the plan's `exit` file: a signal cannot be passed on as the launcher's own exit status):

- the root is a small tmpfs holding what an image would: the host's /usr, /bin, /lib* (read-only
  binds), the Python installation and the repository with its virtualenv at their own paths (the
  workload image's stand-in), a copy-on-write /etc (overlay: /etc/hosts, /etc/passwd and new
  mount points never reach the host's /etc), a private /dev with only the usual device nodes, and a
  /proc of the pod's own PID namespace;
- every volume of the container at its mountPath (bind or tmpfs), read-only where asked;
- the root is remounted read-only when the container asks for `readOnlyRootFilesystem`;
- then hostname, working directory, groups, gid and uid are set and the command is exec'ed, so the
  command is PID 1 of its namespace: a SIGKILL to it ends every process of the container, as on a
  node.

A failure before the exec exits 128 with one line on stderr (a kubelet reports such a container as
StartError). Standard library only: it runs before the container exists.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

HOST_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
"""The image's system directories: the host's, read-only (symlinks such as /bin -> usr/bin are kept)."""
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


class LaunchError(Exception):
    pass


def mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise LaunchError(f"mount {' '.join(args)}: {result.stderr.strip()}")


def bind(source: str, target: Path, *, read_only: bool, recursive: bool = False) -> None:
    mount("--rbind" if recursive else "--bind", source, str(target))
    if read_only:
        mount("-o", "remount,bind,ro", str(target))


def inside(root: Path, path: str) -> Path:
    """`path` of the container as a path under its root on the host."""
    return root / path.lstrip("/")


def mount_point(root: Path, path: str, image_dirs: list[str], *, is_file: bool = False) -> Path:
    """Create a mount point in the container's own layers, never in a directory bound from the host."""
    target = inside(root, path)
    parts = Path(path).parts
    in_image = (len(parts) > 1 and parts[1] in HOST_DIRS) or any(
        Path(path).is_relative_to(d) for d in image_dirs
    )
    if in_image and not target.exists():
        raise LaunchError(f"mountPath {path}: inside a read-only image directory")
    if is_file:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(exist_ok=True)
    else:
        target.mkdir(parents=True, exist_ok=True)
    return target


def build_root(plan: dict[str, Any]) -> Path:
    root = Path(plan["root"])
    mount("--make-rprivate", "/")
    mount("-t", "tmpfs", "-o", "mode=755,size=64m", "rootfs", str(root))
    for name in HOST_DIRS:
        host = Path("/") / name
        if host.is_symlink():
            (root / name).symlink_to(os.readlink(host))
        elif host.is_dir():
            (root / name).mkdir()
            bind(str(host), root / name, read_only=True)
    (root / "proc").mkdir()
    mount("-t", "proc", "proc", str(root / "proc"))
    (root / "sys").mkdir()
    bind("/sys", root / "sys", read_only=True, recursive=True)
    dev = root / "dev"
    dev.mkdir()
    mount("-t", "tmpfs", "-o", "mode=755,size=1m", "dev", str(dev))
    for name in DEVICES:
        if Path("/dev", name).exists():
            (dev / name).touch()
            bind(f"/dev/{name}", dev / name, read_only=False)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
    ):
        (dev / name).symlink_to(target)
    (dev / "stderr").symlink_to("/proc/self/fd/2")
    (dev / "shm").mkdir()
    etc = root / "etc"
    etc.mkdir()
    mount(
        "-t",
        "overlay",
        "overlay",
        "-o",
        f"lowerdir=/etc,upperdir={plan['etc_upper']},workdir={plan['etc_work']}",
        str(etc),
    )
    # The workload image's user (Dockerfile: useradd --uid 1000 specops).
    with (etc / "passwd").open("a") as handle:
        handle.write("specops:x:1000:1000::/home/specops:/usr/sbin/nologin\n")
    with (etc / "group").open("a") as handle:
        handle.write("specops:x:1000:\n")
    (etc / "hostname").write_text(plan["hostname"] + "\n")
    bind(plan["hosts"], mount_point(root, "/etc/hosts", plan["image_dirs"], is_file=True), read_only=True)
    for name in ("tmp", "var/tmp", "home/specops"):
        (root / name).mkdir(parents=True, exist_ok=True)
    os.chown(root / "home/specops", 1000, 1000)
    for item in plan["mounts"]:
        if item["kind"] == "tmpfs":
            target = mount_point(root, item["target"], plan["image_dirs"])
            mount("-t", "tmpfs", "-o", f"mode=1777,size={item['size']}", "tmpfs", str(target))
        else:
            target = mount_point(
                root, item["target"], plan["image_dirs"], is_file=Path(item["source"]).is_file()
            )
            bind(item["source"], target, read_only=bool(item.get("readOnly")))
    # The image directories last: the repository may live under a path a volume covers (a CI
    # clone under /tmp, where every pod mounts an emptyDir), and must stay visible above it.
    for directory in plan["image_dirs"]:
        target = inside(root, directory)
        target.mkdir(parents=True, exist_ok=True)
        bind(directory, target, read_only=True)
    if plan.get("termination"):
        bind(
            plan["termination"],
            mount_point(root, plan["termination_path"], plan["image_dirs"], is_file=True),
            read_only=False,
        )
    if plan.get("read_only_root"):
        mount("-o", "remount,ro", str(etc))
        mount("-o", "remount,ro", str(root))
    return root


CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWPID = 0x00020000, 0x04000000, 0x20000000
PR_SET_PDEATHSIG = 1


def container(plan: dict[str, Any]) -> int:
    """PID 1 of the new namespaces: build the view, drop to the pod's user, exec the command."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the launcher gone (killed) takes the container
    try:
        root = build_root(plan)
        socket.sethostname(plan["hostname"])
        os.chroot(root)
        os.chdir(plan["workdir"])
        os.setgroups(plan["groups"])
        os.setgid(plan["gid"])
        os.setuid(plan["uid"])
        os.umask(0o022)
    except (LaunchError, OSError) as exc:
        print(f"container start failed: {exc}", file=sys.stderr)
        return 128
    try:
        os.execvpe(plan["argv"][0], plan["argv"], plan["env"])
    except OSError as exc:
        print(f"exec {plan['argv'][0]!r}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    return 0  # unreachable: exec replaced the process


def main() -> int:
    """Unshare, fork the container, wait for it; its exit (code or signal) goes to `plan["exit"]`."""
    plan = json.loads(Path(sys.argv[1]).read_text())
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWPID) != 0:
        print(f"container start failed: unshare: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 128
    child = os.fork()
    if child == 0:
        os._exit(container(plan))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, _f: os.kill(child, s))
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except ChildProcessError:
            return 128
        except InterruptedError:
            continue
    outcome = {"code": os.waitstatus_to_exitcode(status)}
    Path(plan["exit"]).write_text(json.dumps(outcome))
    code = outcome["code"]
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
