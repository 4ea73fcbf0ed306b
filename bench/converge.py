"""Benchmark (not a test): deploys/gpu_node.py on 1, 4 and 16 fresh lab hosts.

For each size it prints the first-converge time, the converged re-run time, the drift-check
time (``gpunode drift``: the seal first, docs/performance.md), the same check with ``--full``
(every host planned, facts pipelined), the CPU time of one seal check on a node (what each
more host adds on a machine whose cores the hosts share), the remote commands per host in a
converged run and in a drift check (counted at pyinfra's connector: commands, uploads and
downloads, facts included) and, at the end, the 16-host / 1-host ratios. The re-run, the
drift check and the node's CPU are the median of 3 runs each (the range is printed).

It also times the floor (bench/floor_deploy.py, median of 3): pyinfra connecting to every
host and running one ``true`` there. The re-run minus the floor is what gpunode adds: on
this machine mostly each node's seal check, and lab hosts share the machine's cores, so 16
of them queue for 2 cores where a fleet's nodes each have their own.

    sudo .venv/bin/python bench/converge.py [--sizes 1 4 16]

It uses a lab of its own (``GPUNODE_LAB_NAME=bench5``, 10.231.205.0/24) and takes it down
afterwards. Times are wall-clock seconds of real runs (pyinfra's CLI with -y, as a user
runs it); the machine's cores, memory and load decide them.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ENV = {
    "GPUNODE_LAB_NAME": "bench5",
    "GPUNODE_LAB_SUBNET": "10.231.205.0/24",
    "GPUNODE_LAB_SUBNET6": "fd42:231:205::/64",
    "GPUNODE_LAB_VAULT_PORT": "19051",
    "GPUNODE_LAB_PROXY_PORT": "8895",
    # wishlists of its own (fact pipelining), so a run starts from what it measures
    "GPUNODE_CACHE_DIR": "/tmp/gpunode-bench-cache",
}
INVENTORY = "inventories/lab.py"
DEPLOY = "deploys/gpu_node.py"
FLOOR_DEPLOY = "bench/floor_deploy.py"
REPEAT = 3


def run(*cmd: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.monotonic()
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=3600,
    )
    return time.monotonic() - start, proc


def must(what: str, result: tuple[float, subprocess.CompletedProcess[str]], ok=(0,)) -> float:
    seconds, proc = result
    if proc.returncode not in ok:
        raise SystemExit(
            f"{what} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return seconds


def commands_per_host(what: str) -> Counter[str]:
    """Remote commands per host of one converged deploy (``what`` = "deploy": planned and
    run through pyinfra's API, as gpunode drift --apply does) or one drift check ("drift"),
    counting every command, upload and download the connector sends."""
    os.environ.update(ENV)
    from pyinfra.connectors.ssh import SSHConnector

    from gpunode.commands import drift, run

    counts: Counter[str] = Counter()

    def counting(method):
        def wrapper(self, *args, **kwargs):
            counts[self.host.name] += 1
            return method(self, *args, **kwargs)

        return wrapper

    for name in ("run_shell_command", "put_file", "get_file"):
        setattr(SSHConnector, name, counting(getattr(SSHConnector, name)))
    if what == "drift":
        report = drift.check(INVENTORY, str(REPO / DEPLOY))
        if report.exit_code != 0:
            raise SystemExit(f"drift: {report.lines()}")
        for name, h in report.hosts.items():  # why a host was planned (the parent prints it)
            if not h.sealed:
                print(f"{name}: not proven by its seal: {h.seal}", file=sys.stderr)
        return counts
    inventory = run.load_inventory(INVENTORY)
    with run.prepare(inventory, REPO / DEPLOY) as planned:
        errors = {name: r.error for name, r in planned.results().items() if r.error}
        if errors:
            raise SystemExit(f"errors: {errors}")
        planned.execute()
    return counts


def counted(what: str) -> list[int]:
    proc = subprocess.run(
        [sys.executable, __file__, "--count-only", what],
        cwd=REPO,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=3600,
    )
    for line in proc.stderr.splitlines():
        if "not proven by its seal" in line:
            print(f"   ({line})", flush=True)
    per_host = [int(x) for x in proc.stdout.split()] if proc.returncode == 0 else []
    if not per_host:
        raise SystemExit(f"counting ({what}) failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return per_host


def seal_check_cpu() -> float:
    """CPU seconds (user + sys, children included) of one ``gpunode-seal check`` on lab-01,
    the median of REPEAT, run there as the drift check runs it (what each host adds)."""
    ssh = ("ssh", "-F", str(REPO / ".lab" / ENV["GPUNODE_LAB_NAME"] / "ssh_config"), "lab-01")
    timed = (
        "python3 -I -S -c 'import os, subprocess, sys\n"
        'subprocess.run(["python3", "-I", "-S", sys.argv[1], "check"], '
        "stdout=subprocess.DEVNULL, check=True)\n"
        "t = os.times()\n"
        "print(t.children_user + t.children_system)' /usr/local/sbin/gpunode-seal"
    )
    samples = []
    for _ in range(REPEAT):
        _, proc = run(*ssh, timed)
        if proc.returncode != 0:
            raise SystemExit(f"seal check on lab-01: {proc.stderr[-500:]}")
        samples.append(float(proc.stdout.split()[-1]))
    return statistics.median(samples)


def one_size(n: int) -> dict[str, float]:
    must("lab down", run(sys.executable, "-m", "gpunode.commands.cli", "lab", "down"))
    # `lab up` again keeps healthy hosts and rebuilds those that booted degraded (it
    # happens on a loaded machine); the time is that of the last, successful attempt
    for attempt in range(3):
        up, proc = run(sys.executable, "-m", "gpunode.commands.cli", "lab", "up", "--hosts", str(n))
        if proc.returncode == 0:
            break
        print(f"   (lab up attempt {attempt + 1}: {proc.stderr.strip()[-200:]})", flush=True)
    else:
        must("lab up", (up, proc))
    first = must("first converge", run(sys.executable, "-m", "pyinfra", "-y", INVENTORY, DEPLOY))
    # the short runs are timed REPEAT times each: their median is reported, and the spread
    reruns = [
        must("converged run", run(sys.executable, "-m", "pyinfra", "-y", INVENTORY, DEPLOY))
        for _ in range(REPEAT)
    ]
    floors = [
        must("floor", run(sys.executable, "-m", "pyinfra", "-y", INVENTORY, FLOOR_DEPLOY))
        for _ in range(REPEAT)
    ]
    floor = statistics.median(floors)
    gpunode = (sys.executable, "-m", "gpunode.commands.cli", "drift", INVENTORY, DEPLOY)
    checks = [must("drift", run(*gpunode)) for _ in range(REPEAT)]
    second, check = statistics.median(reruns), statistics.median(checks)
    full = must("drift --full", run(*gpunode, "--full"))
    deploy_cmds, drift_cmds = counted("deploy"), counted("drift")
    node_cpu = seal_check_cpu()
    result = {
        "hosts": n,
        "lab_up_s": up,
        "first_converge_s": first,
        "floor_s": floor,
        "converged_rerun_s": second,
        "drift_check_s": check,
        "drift_full_s": full,
        "commands_per_host": statistics.mean(deploy_cmds),
        "commands_max": max(deploy_cmds),
        "drift_commands_per_host": statistics.mean(drift_cmds),
        "drift_commands_max": max(drift_cmds),
        "seal_check_cpu_s": node_cpu,
    }
    print(
        f"{n:>2} host(s): first converge {first:6.1f} s, converged re-run {second:5.2f} s "
        f"({min(reruns):.2f} to {max(reruns):.2f}), drift check {check:5.2f} s "
        f"({min(checks):.2f} to {max(checks):.2f}) (--full {full:5.2f} s); "
        f"floor (one `true` per host) {floor:5.2f} s ({min(floors):.2f} to {max(floors):.2f}); "
        f"the seal check's CPU on lab-01 {node_cpu * 1000:.0f} ms; remote commands per host: "
        f"converged deploy {result['commands_per_host']:.1f} (max {max(deploy_cmds)}), "
        f"drift check {result['drift_commands_per_host']:.1f} (max {max(drift_cmds)})",
        flush=True,
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--count-only", choices=["deploy", "drift"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.count_only:
        print(" ".join(str(v) for v in commands_per_host(args.count_only).values()))
        return 0
    if os.geteuid() != 0:
        raise SystemExit("bench/converge.py boots lab hosts: run it as root")
    print(
        f"machine: {platform.node()}, {os.cpu_count()} CPU(s), {platform.platform()}, "
        f"python {platform.python_version()}",
        flush=True,
    )
    results = []
    try:
        shutil.rmtree(ENV["GPUNODE_CACHE_DIR"], ignore_errors=True)
        for n in args.sizes:
            results.append(one_size(n))
    finally:
        run(sys.executable, "-m", "gpunode.commands.cli", "lab", "down")
    by_size = {r["hosts"]: r for r in results}
    if 1 in by_size and 16 in by_size:
        one, sixteen = by_size[1], by_size[16]
        print(
            "16-host / 1-host ratio: "
            + ", ".join(
                f"{key.removesuffix('_s').replace('_', ' ')} {sixteen[key] / one[key]:.2f}"
                for key in (
                    "first_converge_s",
                    "floor_s",
                    "converged_rerun_s",
                    "drift_check_s",
                    "drift_full_s",
                    "seal_check_cpu_s",
                    "commands_per_host",
                    "drift_commands_per_host",
                )
            )
        )
        # what a 1.5x re-run leaves the nodes, were the rest free: time over the floor, all
        # cores busy with nothing but the checks
        left = 1.5 * one["converged_rerun_s"] - sixteen["floor_s"]
        cores = os.cpu_count() or 1
        print(
            f"16 hosts within 1.5 x 1 host: {left:.2f} s over the 16-host floor, at most "
            f"{max(left, 0) * cores / 16 * 1000:.0f} ms of CPU per node on {cores} core(s) "
            f"(one seal check on lab-01: {sixteen['seal_check_cpu_s'] * 1000:.0f} ms)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
