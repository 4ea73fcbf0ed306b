"""The periodic drift job (gpunode/nomad_drift.py, gpunode/schema/nomad_drift.py).

The rendered job goes through the same structure check as the inference jobs: Nomad's
``api`` structs recorded in ``fixtures/nomad/api-structs.go``, parsed by
test_nomad_jobs.py (every key a field of the struct at its place, every value of the
field's Go type). Then the content: ``Count = N`` with ``--shard ${NOMAD_ALLOC_INDEX}/N``
(and the N shards, as Nomad numbers the allocations, cover a fleet exactly once), the
periodic batch settings, the SSH key and known_hosts only through Vault templates into
``secrets/``, no secret or Vault token anywhere in the spec. Hostile settings files
(shell characters, ``..``, unpinned images, bad cron expressions, out-of-range shards,
inline secrets, broken YAML) are refused naming the file, the key and what is allowed,
never with a traceback.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_nomad_jobs import STRUCT_DEFS, check_struct  # Nomad's recorded api structs

from gpunode.commands.cli import build_parser
from gpunode.commands.drift import in_shard, parse_shard
from gpunode.config import load
from gpunode.nomad_drift import (
    KNOWN_HOSTS_FILE,
    SSH_KEY_FILE,
    check_inventory,
    command,
    load_settings,
    main,
    render_drift_job,
)
from gpunode.schema.nomad_drift import DriftJob
from gpunode.schema.types import ConfigError

IMAGE = "registry.example.com/gpunode-controller@sha256:" + "d" * 64
# What an operator might store in Vault, and what must never reach a job spec.
PRIVATE_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
VAULT_TOKEN = "hvs.CAESIJ1example0token0never0shown"  # noqa: S105 - a planted fake


def settings(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "image": IMAGE,
        "shards": 4,
        "ssh_key": {"path": "gpunode/fleet-ssh", "key": "private_key"},
        "known_hosts": {"path": "gpunode/fleet-ssh", "key": "known_hosts", "version": 3},
    }
    data.update(changes)
    return data


def write(tmp_path: Path, data: Any, name: str = "drift-job.yml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def rendered(**changes: Any) -> dict[str, Any]:
    return render_drift_job(DriftJob.model_validate(settings(**changes)))


def task_of(job: dict[str, Any]) -> dict[str, Any]:
    (group,) = job["TaskGroups"]
    (task,) = group["Tasks"]
    return task


# --- the structure check: the same one the inference jobs pass ---------------------------


ALL_OPTIONS = {
    "uid": 1000,
    "node_class": "controller",
    "run_timeout": "50m",
    "apply": True,
    "program": "/opt/gpunode/.venv/bin/gpunode",
    "datacenters": ["ops-dc1", "ops-dc2"],
    "priority": 70,
}


@pytest.mark.parametrize("changes", [{}, ALL_OPTIONS], ids=["defaults", "every-option"])
def test_job_matches_nomads_api_structs(changes: dict[str, Any]) -> None:
    job = rendered(**changes)
    assert check_struct(job, "Job", "Job") == []
    assert json.loads(json.dumps(job)) == job  # plain JSON


def test_the_check_reaches_the_periodic_and_template_blocks() -> None:
    # the recorded structs include PeriodicConfig and Template: a wrong key there is caught
    assert "PeriodicConfig" in STRUCT_DEFS and "Template" in STRUCT_DEFS
    job = rendered()
    job["Periodic"]["Cron"] = "17 * * * *"
    task_of(job)["Templates"][0]["Mode"] = "0400"
    problems = check_struct(job, "Job", "Job")
    assert "Job.Periodic.Cron: not a field of Nomad's api.PeriodicConfig" in problems
    assert (
        "Job.TaskGroups[0].Tasks[0].Templates[0].Mode: not a field of Nomad's api.Template"
        in problems
    )


# --- the periodic batch job and the shard math ---------------------------------------------


def test_periodic_batch_job() -> None:
    job = rendered(schedule="*/20 * * * MON-FRI", priority=40, namespace="ops", region="eu")
    assert job["ID"] == job["Name"] == "gpunode-drift"
    assert job["Type"] == "batch"
    assert job["Periodic"] == {
        "Enabled": True,
        "SpecType": "cron",
        "Spec": "*/20 * * * MON-FRI",
        "ProhibitOverlap": True,
        "TimeZone": "UTC",
    }
    assert (job["Priority"], job["Namespace"], job["Region"]) == (40, "ops", "eu")
    assert job["Datacenters"] == ["dc1"]
    (group,) = job["TaskGroups"]
    # a failed run is neither restarted nor rescheduled: the next period runs again
    assert group["RestartPolicy"] == {"Attempts": 0, "Mode": "fail"}
    assert group["ReschedulePolicy"] == {"Attempts": 0, "Unlimited": False}


def test_four_shards_are_four_allocations_of_one_group() -> None:
    job = rendered(shards=4)
    (group,) = job["TaskGroups"]
    assert group["Count"] == 4
    task = task_of(job)
    assert task["Driver"] == "docker"
    assert task["Config"]["image"] == IMAGE
    assert task["Config"]["command"] == "gpunode"
    assert task["Config"]["work_dir"] == "/opt/gpunode"
    assert task["Config"]["args"] == [
        "drift", "/opt/gpunode/inventories/prod.py", "/opt/gpunode/deploys/gpu_node.py",
        "--shard", "${NOMAD_ALLOC_INDEX}/4",
        "--json", "/alloc/data/drift-${NOMAD_ALLOC_INDEX}.json",
        "--prometheus", "/alloc/data/gpunode_drift-${NOMAD_ALLOC_INDEX}.prom",
    ]  # fmt: skip
    assert task["Resources"] == {"CPU": 1000, "MemoryMB": 1024}


def allocation_args(job: dict[str, Any]) -> list[list[str]]:
    """The arguments of each allocation as Nomad runs them: NOMAD_ALLOC_INDEX is 0 .. Count-1,
    interpolated in the driver config."""
    (group,) = job["TaskGroups"]
    args = task_of(job)["Config"]["args"]
    return [
        [a.replace("${NOMAD_ALLOC_INDEX}", str(i)) for a in args] for i in range(group["Count"])
    ]


@pytest.mark.parametrize("shards", [1, 4, 7, 1000])
def test_the_allocations_check_every_host_exactly_once(shards: int) -> None:
    # each allocation's --shard argument, read by gpunode drift's own parse_shard and
    # in_shard (gpunode/commands/drift.py), picks a part of the fleet: together, all of it
    hosts = [f"gpu-{n:04d}" for n in range(2000)]
    seen: list[str] = []
    reports = set()
    for args in allocation_args(rendered(shards=shards)):
        index, total = parse_shard(args[args.index("--shard") + 1])
        assert total == shards
        seen += [h for h in hosts if in_shard(h, index, total)]
        reports.add(args[args.index("--json") + 1])
    assert sorted(seen) == hosts  # each host in exactly one allocation's shard
    assert len(reports) == shards  # and each allocation writes its own report


def test_each_allocations_command_line_is_one_gpunode_drift_accepts() -> None:
    job = rendered(shards=4, apply=True)
    for index, args in enumerate(allocation_args(job)):
        parsed = build_parser().parse_args(args)  # the real `gpunode` command line
        assert parsed.cmd == "drift"
        assert (parsed.inventory, parsed.deploy) == (
            "/opt/gpunode/inventories/prod.py",
            "/opt/gpunode/deploys/gpu_node.py",
        )
        assert parse_shard(parsed.shard) == (index, 4)
        assert parsed.json == f"/alloc/data/drift-{index}.json"
        assert parsed.prometheus == f"/alloc/data/gpunode_drift-{index}.prom"
        assert parsed.apply is True


def test_run_timeout_program_uid_and_node_class() -> None:
    job = rendered(**ALL_OPTIONS)
    task = task_of(job)
    args = task["Config"]["args"]
    assert task["Config"]["command"] == "timeout"
    assert args[:4] == ["--kill-after=30s", "3000s", "/opt/gpunode/.venv/bin/gpunode", "drift"]
    assert args[-1] == "--apply"
    assert task["User"] == "1000"
    assert len(task["Templates"]) == 2
    assert all(t["Uid"] == t["Gid"] == 1000 for t in task["Templates"])
    (group,) = job["TaskGroups"]
    assert {"LTarget": "${node.class}", "Operand": "=", "RTarget": "controller"} in group[
        "Constraints"
    ]
    assert job["Datacenters"] == ["ops-dc1", "ops-dc2"] and job["Priority"] == 70


# --- secrets: only Vault templates into secrets/ ---------------------------------------------


def test_key_and_known_hosts_only_through_vault_templates_into_secrets() -> None:
    task = task_of(rendered())
    assert task["Vault"] == {
        "Role": "gpunode-drift",
        "ChangeMode": "noop",
        "Env": False,  # no VAULT_TOKEN in the task's environment
        "DisableFile": True,  # no secrets/vault_token either
    }
    key, known = task["Templates"]
    for template, dest in ((key, SSH_KEY_FILE), (known, KNOWN_HOSTS_FILE)):
        assert template["DestPath"].startswith("secrets/")
        assert "/" + template["DestPath"] == dest  # the docker driver mounts secrets/ at /secrets
        assert template["Perms"] == "0400" and template["ErrMissingKey"] is True
        assert template["ChangeMode"] == "noop"
        assert "Envvars" not in template  # a file, never environment variables
    assert key["EmbeddedTmpl"] == (
        '{{ with secret "secret/data/gpunode/fleet-ssh" }}'
        '{{ index .Data.data "private_key" | trimSpace }}\n{{ end }}'
    )
    assert known["EmbeddedTmpl"] == (
        '{{ with secret "secret/data/gpunode/fleet-ssh?version=3" }}'
        '{{ index .Data.data "known_hosts" | trimSpace }}\n{{ end }}'
    )
    # nothing else refers to the files or to Vault: not the environment, not the arguments
    assert task["Env"] == {"GPUNODE_CACHE_DIR": "/alloc/data/cache"}
    assert not any("secret" in a for a in task["Config"]["args"])


def test_no_secret_value_or_vault_token_in_the_spec(tmp_path: Path) -> None:
    text = json.dumps(rendered(**ALL_OPTIONS))
    assert "VaultToken" not in text and "VAULT_TOKEN" not in text
    assert "PRIVATE KEY" not in text
    # a settings file cannot carry one: the keys that would hold it do not exist, and the
    # error names the key without echoing the value
    for data in (
        settings(ssh_key={"path": "gpunode/fleet-ssh", "key": "k", "value": PRIVATE_KEY}),
        settings(vault_token=VAULT_TOKEN),
        settings(env={"VAULT_TOKEN": VAULT_TOKEN}),
    ):
        err = io.StringIO()
        assert command(str(write(tmp_path, data)), out=io.StringIO(), err=err) == 1
        assert "unknown key" in err.getvalue()
        assert VAULT_TOKEN not in err.getvalue() and "PRIVATE KEY" not in err.getvalue()


# --- hostile settings ------------------------------------------------------------------------

HOSTILE: list[tuple[str, Any, str]] = [
    ("workdir", "/opt/gpunode;rm -rf /", "is not allowed (allowed: an absolute path"),
    ("inventory", "/opt/$(id)/prod.py", "is not allowed (allowed: an absolute path"),
    ("inventory", "inventories/prod.py", "is not allowed (allowed: an absolute path"),
    ("deploy", "/opt/gpunode/../../etc/passwd", "leaves its directory (allowed: a path inside"),
    ("deploy", "/opt/gpunode/deploys/gpu node.py", "is not allowed (allowed: an absolute path"),
    ("output_dir", "/alloc/data`id`", "is not allowed (allowed: an absolute path"),
    ("cache_dir", "/alloc/data/\ncache", "control character"),
    ("program", "-gpunode", "starts with '-' (allowed: a value that does not start"),
    ("program", "gpunode", "is not allowed (allowed: an absolute path"),
    ("image", "registry.example.com/gpunode-controller:latest", "is not an image pinned by digest"),
    ("image", "gpunode@sha256:" + "d" * 63, "is not an image pinned by digest"),
    ("image", IMAGE + " --privileged", "is not an image pinned by digest"),
    ("schedule", "* * * *", "has 4 field(s)"),
    ("schedule", "* * * * * * *", "has 7 field(s)"),
    ("schedule", "17  * * * *", "extra spaces"),
    ("schedule", "17 * * * *; rm -rf /", "has 8 field(s)"),
    ("schedule", "17 * * * ;id", "day-of-week field ';id'"),
    ("schedule", "60 * * * *", "minute field '60': '60' is not 0-59"),
    ("schedule", "0 24 * * *", "hour field '24': '24' is not 0-23"),
    ("schedule", "0 0 0 * *", "day-of-month field '0'"),
    ("schedule", "0 0 * 13 *", "month field '13'"),
    ("schedule", "0 0 * * FUN", "'FUN' is not 0-7 or SUN-SAT"),
    ("schedule", "*/0 * * * *", "step 0 is not from 1 to 59"),
    ("schedule", "30-10 * * * *", "range 30-10 runs backwards"),
    ("schedule", "@hourly", "has 1 field(s)"),
    ("schedule", "0 0 L * *", "day-of-month field 'L'"),
    ("schedule", "0 0 * * * 1969", "year field '1969'"),
    ("schedule", "$(reboot) * * * *", "minute field '$(reboot)'"),
    ("shards", 0, "shards: 0: Input should be greater than or equal to 1"),
    ("shards", 1001, "shards: 1001: Input should be less than or equal to 1000"),
    ("shards", "4", "(allowed: an integer from 1 to 1000)"),
    ("shards", True, "(allowed: an integer from 1 to 1000)"),
    ("job_id", "Gpunode Drift", "is not allowed (allowed: a-z, 0-9"),
    ("vault_role", 'gpunode"-drift', "is not allowed (allowed: a-z, 0-9"),
    ("datacenters", [], "(allowed: a list of at least 1 item(s))"),
    ("datacenters", ["dc1", "dc 2"], "datacenters[1]"),
    ("priority", 101, "(allowed: a number at most 100)"),
    ("cpu_mhz", 10, "(allowed: a number at least 100)"),
    ("uid", -1, "(allowed: a number at least 0)"),
    ("run_timeout", "1 hour", "(allowed: a duration such as 30s, 5m or 1h30m)"),
    ("ssh_key", {"path": "../../sys/mounts", "key": "k"}, "ssh_key.path"),
    ("ssh_key", {"path": "gpunode/fleet-ssh", "key": 'k" }}{{ end'}, "ssh_key.key"),
    ("known_hosts", {"path": "gpunode/x", "key": "k", "mount": "sec ret"}, "known_hosts.mount"),
    ("known_hosts", {"path": "gpunode/x"}, "known_hosts.key: required key is missing"),
]


@pytest.mark.parametrize(
    "key, value, message", HOSTILE, ids=[f"{k}={str(v)[:30]!r}" for k, v, _ in HOSTILE]
)
def test_hostile_settings_are_refused_naming_file_key_and_allowed(
    key: str, value: Any, message: str, tmp_path: Path
) -> None:
    path = write(tmp_path, settings(**{key: value}))
    out, err = io.StringIO(), io.StringIO()
    assert command(str(path), out=out, err=err) == 1
    assert out.getvalue() == ""  # no job is printed
    text = err.getvalue()
    assert text.startswith(f"gpunode drift-job: {path}: drift job: {key}")
    assert message in text
    assert "(allowed: " in text or text.endswith(": required key is missing\n")
    assert "Traceback" not in text


@pytest.mark.parametrize(
    "content, message",
    [
        ("image: [unclosed", "YAML error"),
        ("- just\n- a list\n", "the settings must be a mapping of keys (allowed keys: job_id"),
        ("", "not NoneType"),
        ("shards: 2\nshards: 3\n", "duplicate key 'shards'"),
        ("1: 2\n", "a key is not a string"),
        ("image: !!python/object/apply:os.system ['id']\n", "YAML error"),
        (b"image: \xff\xfe\n", "line 1: byte 0xff is not UTF-8"),
        ("a: " + "x" * 70_000, "larger than 65536 bytes"),
    ],
    ids=["syntax", "list", "empty", "dupe", "int-key", "python-tag", "not-utf8", "huge"],
)
def test_broken_settings_files_are_refused_without_traceback(
    content: str | bytes, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "drift-job.yml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    err = io.StringIO()
    assert command(str(path), out=io.StringIO(), err=err) == 1
    assert f"{path}:" in err.getvalue() and message in err.getvalue()
    assert "Traceback" not in err.getvalue()


def test_missing_settings_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yml: cannot read the settings: No such file"):
        load_settings(tmp_path / "nope.yml")


@pytest.mark.parametrize(
    "schedule",
    ["17 * * * *", "*/15 * * * MON-FRI", "0 3 1,15 * *", "5 4 * jan-mar sun", "0 0 ? * 7",
     "1-59/2 0-23/6 1-31 1-12 0-7 2026-2030"],
)  # fmt: skip
def test_good_cron_expressions_are_kept_as_written(schedule: str) -> None:
    assert rendered(schedule=schedule)["Periodic"]["Spec"] == schedule


# --- the command line ------------------------------------------------------------------------


def test_main_prints_the_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, settings(shards=8))
    assert main(["--settings", str(path)]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed) == render_drift_job(load_settings(path))
    assert json.loads(printed)["TaskGroups"][0]["Count"] == 8
    assert main(["--settings", str(path)]) == 0
    assert capsys.readouterr().out == printed  # stable: the same file, the same bytes


def fleet(**connection: Any) -> dict[str, Any]:
    good = {"key_file": SSH_KEY_FILE, "known_hosts_file": KNOWN_HOSTS_FILE}
    return {
        "defaults": {"distro": "ubuntu2404", "firewall": {"enabled": False}},
        "hosts": {
            "gpu-0001": {"connection": {"address": "192.0.2.11", **good}},
            "gpu-0002": {"connection": {"address": "192.0.2.12", **good, **connection}},
        },
    }


def test_inventory_pointing_at_the_jobs_files_passes() -> None:
    assert check_inventory(load(fleet(), source="fleet.yml")) == []


@pytest.mark.parametrize(
    "connection, message",
    [
        ({"key_file": "~/.ssh/id_ed25519"}, "connection.key_file: '~/.ssh/id_ed25519' is not"),
        ({"key_file": None}, "connection.key_file: None is not the job's key file"),
        ({"known_hosts_file": "/etc/ssh/ssh_known_hosts"}, "connection.known_hosts_file"),
        (
            {"strict_host_key_checking": "accept-new"},
            "connection.strict_host_key_checking: 'accept-new' (allowed: yes",
        ),
    ],
)
def test_inventory_with_other_ssh_files_is_refused(
    connection: dict[str, Any], message: str, tmp_path: Path
) -> None:
    inventory = write(tmp_path, fleet(**connection), "prod.yml")
    err = io.StringIO()
    rc = command(str(write(tmp_path, settings())), str(inventory), out=io.StringIO(), err=err)
    assert rc == 1
    assert f"{inventory}: host gpu-0002: {message}" in err.getvalue()
    assert "gpu-0001" not in err.getvalue()
    assert command(str(write(tmp_path, settings())), str(tmp_path / "prod.py"), err=err) == 1
    assert "not an inventory YAML file" in err.getvalue()


# --- the docs' example is valid and renders ------------------------------------------------

FLEET_DOC = Path(__file__).parents[2] / "docs" / "fleet.md"


def test_the_docs_example_settings_render_a_valid_job(tmp_path: Path) -> None:
    text = FLEET_DOC.read_text()
    example = re.search(r"### The settings.*?```yaml\n(.*?)```", text, re.S)
    assert example
    job = render_drift_job(load_settings(write(tmp_path, example[1])))
    assert check_struct(job, "Job", "Job") == []
    assert job["TaskGroups"][0]["Count"] == 8
    assert re.search(r"Measured with `bench/converge.py` on \d{4}-\d\d-\d\d", text)
