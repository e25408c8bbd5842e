"""Undo what hack/realnode.py does to the host: processes, cgroups, mounts, network namespaces,
iptables chains, the bridge, pod log links and sysctls. Each function is safe to call when there
is nothing to undo."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
NETNS = Path("/run/netns")
TABLES = ("filter", "nat", "mangle")
OURS = re.compile(r"^(KUBE-|CNI-)")


def read_sysctls(names: tuple[str, ...]) -> dict[str, str]:
    values = {}
    for name in names:
        with contextlib.suppress(OSError):
            values[name] = (Path("/proc/sys") / name).read_text().strip()
    return values


def write_sysctls(values: dict[str, str]) -> None:
    for name, value in values.items():
        with contextlib.suppress(OSError):
            (Path("/proc/sys") / name).write_text(value)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie of ours: reap it
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False
    return True


def terminate(pid: int, grace: float = 15.0) -> None:
    """SIGTERM a process group started with start_new_session, SIGKILL after `grace`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    while _alive(pid):
        time.sleep(0.05)


def _cmdline(pid: str) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def kill_shims(containerd_address: str) -> None:
    """SIGKILL the runc shims of the containerd at `containerd_address` (they outlive it)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        argv = _cmdline(pid)
        if argv and argv[0].endswith("containerd-shim-runc-v2") and containerd_address in argv:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _kubepods_dirs() -> list[Path]:
    dirs: list[Path] = []
    for hierarchy in CGROUP.iterdir() if CGROUP.is_dir() else []:
        top = hierarchy / "kubepods"
        if top.is_dir():
            dirs += [Path(root) for root, _, _ in os.walk(top)]
    return dirs


def remove_kubepods_cgroups() -> None:
    """Kill what is left in the kubelet's `kubepods` cgroups, then remove them, deepest first."""
    for directory in _kubepods_dirs():
        with contextlib.suppress(OSError):
            for pid in (directory / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
    for directory in sorted(_kubepods_dirs(), key=lambda d: len(d.parts), reverse=True):
        for _ in range(50):
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


def _mountpoints() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        points.append(point)
    return points


def unmount_under(root: Path) -> None:
    """Unmount every mount at or below `root`, deepest first (lazily where busy)."""
    prefix = str(root.resolve())
    for _ in range(5):
        points = [p for p in _mountpoints() if p == prefix or p.startswith(prefix + "/")]
        if not points:
            return
        for point in sorted(points, key=len, reverse=True):
            if subprocess.run(["umount", point], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def netns_names() -> set[str]:
    return {p.name for p in NETNS.iterdir()} if NETNS.is_dir() else set()


def remove_netns(names: set[str]) -> None:
    """Remove the named network namespaces (containerd's cni-* bind mounts) left behind."""
    for name in names:
        path = NETNS / name
        subprocess.run(["umount", str(path)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            path.unlink()


def _iptables(family: str) -> str:
    return "ip6tables" if family == "ipv6" else "iptables"


def chains() -> dict[str, list[str]]:
    """The chains each family's tables have now: `family/table` -> names."""
    found: dict[str, list[str]] = {}
    for family in ("ipv4", "ipv6"):
        for table in TABLES:
            result = subprocess.run([_iptables(family), "-w", "-t", table, "-S"],
                                    capture_output=True, text=True, check=False)  # fmt: skip
            found[f"{family}/{table}"] = [
                line.split()[1] for line in result.stdout.splitlines()
                if line.startswith(("-N ", "-P "))
            ]  # fmt: skip
    return found


def remove_chains(before: dict[str, list[str]], network: str) -> None:
    """Remove the KUBE-*/CNI-* chains that were not there `before`, every rule that jumps to
    them, and every rule whose comment names the CNI `network`."""
    for key, existing in before.items():
        family, table = key.split("/")
        tool = [_iptables(family), "-w", "-t", table]
        rules = subprocess.run([*tool, "-S"], capture_output=True, text=True, check=False).stdout
        new = {
            line.split()[1] for line in rules.splitlines()
            if line.startswith("-N ") and OURS.match(line.split()[1])
            and line.split()[1] not in existing
        }  # fmt: skip
        for line in rules.splitlines():
            if not line.startswith("-A "):
                continue
            words = line.split()
            target = words[words.index("-j") + 1] if "-j" in words else ""
            if words[1] not in new and (target in new or f'name: \\"{network}\\"' in line):
                delete = [*tool, "-D", *shlex.split(line)[1:]]
                subprocess.run(delete, capture_output=True, check=False)
        for chain in new:
            subprocess.run([*tool, "-F", chain], capture_output=True, check=False)
        for chain in new:
            subprocess.run([*tool, "-X", chain], capture_output=True, check=False)


def remove_link(name: str) -> None:
    subprocess.run(["ip", "link", "delete", name], capture_output=True, check=False)


def remove_pod_log_links(root: Path) -> None:
    """The kubelet links /var/log/containers/*.log to the pod logs (under `root` here)."""
    links = Path("/var/log/containers")
    for link in links.iterdir() if links.is_dir() else []:
        with contextlib.suppress(OSError):
            if link.is_symlink() and os.readlink(link).startswith(str(root)):
                link.unlink()


def remove_device_plugin_files(directory: Path) -> None:
    """The kubelet's device-plugin sockets and checkpoint (in /var/lib/kubelet/device-plugins
    whatever its --root-dir)."""
    for name in ("kubelet.sock", "finetune-gpu.sock", "kubelet_internal_checkpoint"):
        with contextlib.suppress(OSError):
            (directory / name).unlink()


def remove_created_dirs(existed: dict[str, bool]) -> None:
    """Remove each directory that did not exist before, if nothing but empty directories is
    left in it (what others put there stays)."""
    for name, was_there in existed.items():
        if was_there or not Path(name).is_dir():
            continue
        for root, _, _ in sorted(os.walk(name), key=lambda w: len(w[0]), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(root)
