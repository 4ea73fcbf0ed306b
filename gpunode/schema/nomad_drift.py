"""The periodic Nomad job that checks a fleet for drift in shards (gpunode/nomad_drift.py).

A fleet of thousands of nodes is checked by ``shards`` parallel allocations of one
periodic batch job: allocation ``I`` of ``N`` runs ``gpunode drift INVENTORY DEPLOY
--shard I/N`` from the deploy repository baked into ``image``, so each host is checked
by exactly one allocation (``int(sha256(host), 16) % N == I``). The fleet's SSH key and
known_hosts come from Vault through ``template`` blocks into the task's ``secrets/``
directory; this model holds only where they are in Vault, never a value.

Every value of the rendered job comes from :class:`DriftJob` (every default next to its
field). It is not a key of a node's config: ``gpunode.nomad_drift.main`` reads it from
its own YAML file.

Example (``drift-job.yml``)::

    image: registry.example.com/gpunode-controller@sha256:<64 hex digits>
    shards: 8
    schedule: "17 * * * *"
    datacenters: [ops-dc1]
    ssh_key: {path: gpunode/fleet-ssh, key: private_key}
    known_hosts: {path: gpunode/fleet-ssh, key: known_hosts}
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, field_validator

from gpunode.schema.types import AbsPath, Duration, Image, KvPath, Model, Name, SecretKey

MAX_SHARDS = 1000

# --- cron expressions as Nomad reads them (hashicorp/cronexpr) ------------------------------

# hashicorp/cronexpr (Nomad's `periodic.crons` parser): five fields (minute hour
# day-of-month month day-of-week), or six with a year after them ("If only six fields are
# present, a 0 second field is prepended"). gpunode accepts the plain subset: numbers and
# names, ranges, lists, steps and '*' ('?' in the day fields); no L, W or '#' forms, no
# @hourly-style names, no seconds field.
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


class _CronField:
    def __init__(
        self, name: str, low: int, high: int, names: tuple[str, ...] = (), first: int = 0
    ) -> None:
        self.name, self.low, self.high = name, low, high
        self.names = {n: first + i for i, n in enumerate(names)}
        self.question = name in ("day-of-month", "day-of-week")

    def allowed(self) -> str:
        words = f" or {self.names_range()}" if self.names else ""
        return f"{self.low}-{self.high}{words}"

    def names_range(self) -> str:
        names = list(self.names)
        return f"{names[0].upper()}-{names[-1].upper()}"


_FIELDS = (
    _CronField("minute", 0, 59),
    _CronField("hour", 0, 23),
    _CronField("day-of-month", 1, 31),
    _CronField("month", 1, 12, _MONTHS, first=1),
    _CronField("day-of-week", 0, 7, _DAYS),  # 7 is Sunday too, like 0
    _CronField("year", 1970, 2099),
)
_ITEM_RE = re.compile(r"(\*|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?")
CRON_HELP = (
    "a cron expression of 5 fields (minute hour day-of-month month day-of-week) or 6 (a year "
    "after them), separated by single spaces; each field '*', a number or name, a range a-b, "
    "a step */n or a-b/n, or a list of those separated by ','; e.g. '17 * * * *' (hourly at "
    "minute 17) or '*/15 * * * MON-FRI'"
)


def cron_expression(value: str) -> str:
    """A cron expression Nomad's parser reads the way it reads here; else the error."""
    shown = repr(value[:80])
    fields = value.split(" ")
    if len(fields) not in (5, 6) or not all(fields):
        raise ValueError(
            f"{shown} has {len([f for f in fields if f])} field(s) or extra spaces "
            f"(allowed: {CRON_HELP})"
        )
    for text, spec in zip(fields, _FIELDS, strict=False):
        for item in text.split(","):
            problem = _cron_item(item, spec)
            if problem:
                raise ValueError(
                    f"{shown}: {spec.name} field {text[:40]!r}: {problem} (allowed: {CRON_HELP})"
                )
    return value


def _cron_item(item: str, spec: _CronField) -> str | None:
    """What is wrong with one item of a cron field (None: nothing)."""
    if item == "?" and spec.question:
        return None
    match = _ITEM_RE.fullmatch(item)
    if not match:
        return f"{item[:20]!r} is not '*', a value, a range or a step"
    base, _, step = match.groups()
    if step is not None and not 1 <= int(step[1:]) <= spec.high:
        return f"step {step[1:]} is not from 1 to {spec.high}"
    if base == "*":
        return None
    values = []
    for part in base.split("-"):
        number = spec.names.get(part.lower()) if not part.isdigit() else int(part)
        if number is None or not spec.low <= number <= spec.high:
            return f"{part[:20]!r} is not {spec.allowed()}"
        values.append(number)
    if len(values) == 2 and values[0] > values[1]:
        return f"range {base} runs backwards"
    return None


class SecretRef(Model):
    """Where one value is in Vault (KV v2): the same mount, path, key and version fields as a
    ``secrets.<name>`` entry (gpunode/schema/vault.py Secret), without its node-side fields
    (file, owner, mode, units): the value goes to the task's ``secrets/`` directory, read by
    the task's own workload identity."""

    mount: KvPath = "secret"
    """The KV v2 mount (the job's Vault role must be allowed to read it)."""
    path: KvPath
    """The path in the mount, without data/ (e.g. gpunode/fleet-ssh)."""
    key: SecretKey
    """The key inside the secret (e.g. private_key)."""
    version: Annotated[int, Field(ge=1)] | None = None
    """Pin a version; default: the latest."""

    def api_path(self) -> str:
        """The path a ``secret`` template function reads (KV v2: ``<mount>/data/<path>``)."""
        path = f"{self.mount}/data/{self.path}"
        return f"{path}?version={self.version}" if self.version is not None else path


class DriftJob(Model):
    """One periodic batch job that checks the fleet in ``shards`` parallel allocations."""

    job_id: Name = "gpunode-drift"
    """The job's ID and name in Nomad."""
    image: Image
    """The container image with gpunode, the deploy repository and the fleet inventory,
    pinned by digest (`<name>@sha256:<64 hex digits>`); required."""
    shards: Annotated[int, Field(ge=1, le=MAX_SHARDS)] = 1
    """Allocations (the group's `count`): allocation `I` checks the hosts with
    `int(sha256(host), 16) % shards == I`."""
    schedule: str = "17 * * * *"
    """When the job runs, a cron expression in UTC (Nomad's `periodic.crons`): 5 fields
    (minute hour day-of-month month day-of-week) or 6 (a year after them); a run that has
    not finished when the next is due makes Nomad skip that one (`prohibit_overlap`)."""
    workdir: AbsPath = "/opt/gpunode"
    """The deploy repository inside the image: the task's working directory."""
    inventory: AbsPath = "/opt/gpunode/inventories/prod.py"
    """The fleet's inventory inside the image. Every host's `connection.key_file` and
    `connection.known_hosts_file` must be the files the job's templates write
    (`/secrets/fleet_ssh_key`, `/secrets/known_hosts`), with `strict_host_key_checking: yes`
    (`gpunode.nomad_drift.check_inventory`)."""
    deploy: AbsPath = "/opt/gpunode/deploys/gpu_node.py"
    """The deploy to check, inside the image."""
    program: AbsPath | None = None
    """The gpunode program inside the image; null: `gpunode` from the image's `PATH`."""
    apply: bool = False
    """Correct what drifted (`gpunode drift --apply`); false: only report it."""
    output_dir: AbsPath = "/alloc/data"
    """Where each allocation writes its reports (`drift-<I>.json`, `gpunode_drift-<I>.prom`);
    `/alloc/data` is the allocation's own directory (`nomad alloc fs`), kept until Nomad
    garbage-collects the allocation."""
    cache_dir: AbsPath = "/alloc/data/cache"
    """`GPUNODE_CACHE_DIR` for the run (fact pipelining's per-host wishlists). The
    allocation's directory starts empty each period: a path on a persistent volume keeps
    the wishlists from one run to the next."""
    run_timeout: Duration | None = None
    """Stop a run that takes longer than this (coreutils `timeout` in the image sends TERM,
    then KILL 30s later); null: no limit. With `prohibit_overlap` a hung run blocks every
    later one, so set it below the schedule's interval."""
    ssh_key: SecretRef
    """The fleet's SSH private key in Vault; required. Written to `/secrets/fleet_ssh_key`
    (mode 0400) in the task."""
    known_hosts: SecretRef
    """The fleet's known_hosts lines in Vault; required. Written to `/secrets/known_hosts`
    (mode 0400) in the task."""
    vault_role: Name = "gpunode-drift"
    """The Vault role of the task's workload identity (JWT auth): it must be allowed to read
    `ssh_key` and `known_hosts`, nothing else."""
    uid: Annotated[int, Field(ge=0, le=2**31 - 2)] | None = None
    """Run the task as this user ID (docker `user`) and make it the owner of the secret
    files; null: the image's user, and the files belong to root."""
    cpu_mhz: Annotated[int, Field(ge=100, le=1_000_000)] = 1000
    """CPU reserved per allocation, in MHz."""
    memory_mb: Annotated[int, Field(ge=128, le=1_048_576)] = 1024
    """RAM reserved per allocation, in MB."""
    priority: Annotated[int, Field(ge=1, le=100)] = 50
    """The job's scheduling priority (Nomad: 1 to 100)."""
    datacenters: list[Name] = Field(default_factory=lambda: ["dc1"], min_length=1)
    """The datacenters whose clients may run the allocations."""
    node_class: Name | None = None
    """Only on Nomad clients of this `node_class` (e.g. the controllers'); null: any."""
    namespace: Name = "default"
    """The namespace the job is registered in."""
    region: Name = "global"
    """The region the job is registered in."""

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        return cron_expression(value)
