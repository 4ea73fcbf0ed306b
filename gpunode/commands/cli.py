"""The ``gpunode`` command: lab, check, verify, drift."""

from __future__ import annotations

# Like pyinfra's own CLI: gevent patches the standard library before anything imports ssl
# or socket (drift, rotate and rollout run pyinfra's API in this process; hvac talks TLS).
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import sys  # noqa: E402

from gpunode import __version__  # noqa: E402


def _lab(args: argparse.Namespace) -> int:
    from gpunode.commands import lab

    try:
        settings = lab.LabSettings.from_env()
        if args.lab_cmd == "up":
            lab.up(settings, count=args.hosts, front_door=args.front_door)
            ok, lines = lab.status(settings)
            print("\n".join(lines))
            return 0 if ok else 1
        if args.lab_cmd == "down":
            lab.down(settings)
            return 0
        if args.lab_cmd == "ask":
            print(lab.door.ask(settings, args.prompt))
            return 0
        ok, lines = lab.status(settings)
        print("\n".join(lines))
        return 0 if ok else 1
    except (lab.LabError, lab.door.FrontDoorError) as exc:
        print(f"gpunode lab {args.lab_cmd}: {exc}", file=sys.stderr)
        return 1


def _vm_lab(args: argparse.Namespace) -> int:
    from gpunode.commands import lab, vmlab

    try:
        settings = vmlab.VmLabSettings.from_env()
        if args.vm_cmd == "up":
            vmlab.up(settings)
        elif args.vm_cmd == "down":
            vmlab.down(settings)
            return 0
        ok, lines = vmlab.status(settings)
        print("\n".join(lines))
        return 0 if ok else 1
    except (vmlab.VmLabError, lab.LabError) as exc:
        print(f"gpunode vm-lab {args.vm_cmd}: {exc}", file=sys.stderr)
        return 1


def _check(args: argparse.Namespace) -> int:
    from gpunode.inventory import load_inventory_file

    inv = load_inventory_file(args.inventory)
    for name, host in inv.hosts.items():
        print(f"{name}: {host.config.distro} groups={','.join(host.groups) or '-'}")
    print(f"{args.inventory}: {len(inv.hosts)} host(s), configuration valid")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from gpunode.commands.verify import verify

    return verify(args.inventory, limit=args.limit, junit=args.junit)


def _drift_job(args: argparse.Namespace) -> int:
    from gpunode.nomad_drift import command

    return command(args.settings, args.inventory)


def _nomad(args: argparse.Namespace) -> int:
    from gpunode.commands.nomad import command

    wait, limit = not args.no_wait, args.limit
    return command(args.nomad_cmd, args.inventory, limit=limit, wait=wait, timeout=args.timeout)


def _rollout(args: argparse.Namespace) -> int:
    from gpunode.commands.rollout import rollout
    from gpunode.inventory import load_inventory_file

    inv = load_inventory_file(args.inventory)
    unknown = [h for h in args.limit or [] if h not in inv.hosts]
    if unknown:
        print(f"gpunode rollout: unknown host(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    report = rollout(
        args.inventory,
        inv,
        deploy=args.deploy,
        hosts=args.limit,
        canary=args.canary,
        batch_size=args.batch_size,
        timeout=args.timeout,
        revert=args.revert,
    )
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def _drift(args: argparse.Namespace) -> int:
    from gpunode.commands.drift import main as drift

    return drift(
        args.inventory,
        args.deploy,
        limit=args.limit,
        apply=args.apply,
        json_path=args.json,
        prometheus_path=args.prometheus,
        shard=args.shard,
        use_seal=not args.full,
    )


def _rotate(args: argparse.Namespace) -> int:
    from gpunode.commands import rotate

    value = rotate.generate_value() if args.generate else sys.stdin.read().rstrip("\n")
    return rotate.main(
        args.inventory,
        args.secret,
        value,
        batch=args.batch,
        rollback=args.rollback,
        destroy_old=args.destroy_old,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpunode", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gpunode {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)

    lab_p = sub.add_parser("lab", help="the lab of real test hosts (needs root)")
    lab_sub = lab_p.add_subparsers(dest="lab_cmd", required=True)
    up_p = lab_sub.add_parser("up", help="build/boot the lab; keeps healthy hosts")
    up_p.add_argument("--hosts", type=int, default=2, help="number of hosts (default 2)")
    up_p.add_argument(
        "--front-door",
        action="store_true",
        help="lab-01 also serves a real model (llama.cpp, CPU) behind the gateway (TLS from "
        "the lab's Vault PKI); writes gateway.json in the lab's state directory",
    )
    ask_p = lab_sub.add_parser(
        "ask", help="one chat completion through the front door's gateway (TLS, demo key)"
    )
    ask_p.add_argument("prompt", help="the user message")
    lab_sub.add_parser("status", help="show the lab; exit 1 if anything is down")
    lab_sub.add_parser("down", help="stop and remove everything the lab made")
    lab_p.set_defaults(func=_lab)

    vm_p = sub.add_parser(
        "vm-lab", help="the Vagrant lab on real VMs, from a box built here (needs root)"
    )
    vm_sub = vm_p.add_subparsers(dest="vm_cmd", required=True)
    vm_sub.add_parser("up", help="libvirtd, the box, `vagrant up`, the VMs' package proxy")
    vm_sub.add_parser("status", help="show the VM lab; exit 1 if anything is down")
    vm_sub.add_parser("down", help="destroy the VMs; remove their disks, networks and processes")
    vm_p.set_defaults(func=_vm_lab)

    check_p = sub.add_parser("check", help="validate an inventory's configuration; touches no host")
    check_p.add_argument("inventory", help="inventory file (inventories/prod.py or its .yml)")
    check_p.set_defaults(func=_check)

    verify_p = sub.add_parser(
        "verify", help="run the host checks (tests/host) against an inventory"
    )
    verify_p.add_argument("inventory")
    verify_p.add_argument("--limit", action="append", help="only these hosts or groups")
    verify_p.add_argument("--junit", help="write JUnit XML here")
    verify_p.set_defaults(func=_verify)

    roll_p = sub.add_parser(
        "rollout",
        help="deploy host by host (canary first), wait for inference health, stop on failure",
    )
    roll_p.add_argument("inventory")
    roll_p.add_argument("--deploy", default="deploys/gpu_node.py", help="the deploy file")
    roll_p.add_argument("--limit", action="append", help="only these hosts, in this order")
    roll_p.add_argument("--canary", type=int, default=1, help="hosts in the first batch")
    roll_p.add_argument("--batch-size", type=int, default=1, help="hosts per later batch")
    roll_p.add_argument(
        "--timeout", type=float, help="seconds to wait for health (default: health_timeout)"
    )
    roll_p.add_argument(
        "--revert", action="store_true", help="put a failed host back on its previous model"
    )
    roll_p.set_defaults(func=_rollout)

    rot_p = sub.add_parser(
        "rotate",
        help="write a new version of a Vault secret or a gateway client's key and roll it out "
        "host by host",
    )
    rot_p.add_argument("inventory")
    rot_p.add_argument(
        "secret",
        help="the secret's name under `secrets:` in the inventory, or gateway.clients.<client> "
        "for a gateway client's key",
    )
    how = rot_p.add_mutually_exclusive_group(required=True)
    how.add_argument("--generate", action="store_true", help="a new random value (32 bytes)")
    how.add_argument("--value-from-stdin", action="store_true", help="the new value on stdin")
    rot_p.add_argument("--batch", type=int, default=1, help="hosts per step (default 1)")
    rot_p.add_argument(
        "--rollback",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="put a failing host back on the old version (default: the secret's `rollback`; "
        "true for a client's key)",
    )
    rot_p.add_argument("--destroy-old", action="store_true", help="destroy the old version after")
    rot_p.set_defaults(func=_rotate)

    drift_p = sub.add_parser(
        "drift",
        help="list per host the operations of a deploy that would change "
        "(exit 0 none, 2 drift, 1 error)",
    )
    drift_p.add_argument("inventory")
    drift_p.add_argument("deploy", help="deploy file, e.g. deploys/gpu_node.py")
    drift_p.add_argument("--limit", action="append", help="only these hosts or groups")
    drift_p.add_argument(
        "--apply", action="store_true", help="run the deploy where it drifted, then check again"
    )
    drift_p.add_argument(
        "--shard",
        metavar="I/N",
        help="check only shard I of N (hosts split by a hash of their name; 0 <= I < N)",
    )
    drift_p.add_argument(
        "--full",
        action="store_true",
        help="plan every host; without it a node whose seal proves it converged is not planned",
    )
    drift_p.add_argument("--json", help="write the report as JSON here")
    drift_p.add_argument(
        "--prometheus", help="write Prometheus metrics here (node_exporter textfile collector)"
    )
    drift_p.set_defaults(func=_drift)

    nomad_p = sub.add_parser(
        "nomad", help="inference services as Nomad jobs: render, plan (exit 2: changes), run"
    )
    nomad_p.add_argument("nomad_cmd", choices=["render", "plan", "run"])
    nomad_p.add_argument("inventory")
    nomad_p.add_argument("--limit", action="append", help="only jobs of these hosts or groups")
    nomad_p.add_argument("--no-wait", action="store_true", help="run: do not wait for deployments")
    nomad_p.add_argument("--timeout", type=float, default=900.0, help="run: seconds per deployment")
    nomad_p.set_defaults(func=_nomad)

    job_p = sub.add_parser(
        "drift-job",
        help="the Nomad periodic job that runs `gpunode drift --shard I/N` over a fleet "
        "(JSON for POST /v1/jobs; docs/fleet.md)",
    )
    job_p.add_argument("--settings", required=True, help="the job's settings (YAML)")
    job_p.add_argument(
        "--inventory", help="the fleet inventory's YAML: check it uses the job's SSH files"
    )
    job_p.set_defaults(func=_drift_job)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
