"""`gpunode rotate INV gateway.clients.<client>` on the real front door: a client's key
replaced host by host while the gateway serves, on real lab hosts (real HAProxy, real
OpenBao KV and PKI, a real model behind the gateway).

The lab is `gpunode lab up --front-door` (as in tests/lab/test_gateway.py): lab-01 serves
the model behind the gateway with the clients ``demo`` and ``bench``; this machine is the
controller. The rotation runs with its own AppRole (KV write, check-and-set, destroy; the
PKI lines the gateway role needs), like an operator's.
"""

from __future__ import annotations

import json
import shlex
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import hvac
import pytest

from gpunode.clients.pki import controller_policy
from gpunode.commands import lab_front_door as door
from gpunode.gateway import KEYS_MAP, key_digest

from .conftest import Lab, front_door_lab, gpunode, root_vault

INVENTORY = "inventories/lab.py"
DEPLOY = "deploys/gpu_node.py"
ROTATE_POLICY = (
    'path "secret/data/gpunode/*" { capabilities = ["create", "read", "update"] }\n'
    'path "secret/metadata/gpunode/*" { capabilities = ["read"] }\n'
    'path "secret/destroy/gpunode/*" { capabilities = ["update"] }\n'
    + controller_policy(door.PKI_MOUNT, door.PKI_ROLE)
)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Fresh hosts with the front door, deployed once."""
    yield from front_door_lab()


# --- helpers ---------------------------------------------------------------------------------


def access(lab: Lab) -> dict[str, str]:
    return json.loads((lab.state_dir / "gateway.json").read_text())


def vault(lab: Lab) -> hvac.Client:
    return root_vault(lab)


def key_in_vault(lab: Lab, path: str) -> tuple[str, int]:
    """The latest key at ``path`` and its version (root token)."""
    resp = vault(lab).secrets.kv.v2.read_secret_version(
        path=path, mount_point="secret", raise_on_deleted_version=True
    )
    return resp["data"]["data"]["api_key"], int(resp["data"]["metadata"]["version"])


def approle(lab: Lab, role: str, policy_hcl: str) -> dict[str, str]:
    """A role with its own policy; env for gpunode (role_id and secret_id override)."""
    c = vault(lab)
    c.sys.create_or_update_policy(role, policy_hcl)
    c.auth.approle.create_or_update_approle(role, token_policies=[role], token_ttl="10m")  # noqa: S106
    return {
        "VAULT_ROLE_ID": c.auth.approle.read_role_id(role)["data"]["role_id"],
        "VAULT_SECRET_ID": c.auth.approle.generate_secret_id(role)["data"]["secret_id"],
    }


def status(lab: Lab, key: str) -> int:
    """GET /v1/models from the controller with ``key``, TLS verified against the Vault CA."""
    info = access(lab)
    req = urllib.request.Request(f"{info['url']}/v1/models")  # noqa: S310
    req.add_header("Authorization", f"Bearer {key}")
    context = ssl.create_default_context(cafile=info["ca_file"])
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as resp:  # noqa: S310
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


# --- the rotation ------------------------------------------------------------------------------


def test_rotating_the_demo_key_while_another_client_keeps_working(lab: Lab) -> None:
    old_key, old_version = key_in_vault(lab, door.CLIENT_PATH)
    second = (lab.state_dir / f"gateway-{door.BENCH_CLIENT}.key").read_text().strip()
    assert status(lab, old_key) == 200
    assert status(lab, second) == 200

    results: list[int | str] = []
    stop = threading.Event()

    def loop() -> None:  # the second client, throughout the rotation
        while not stop.is_set():
            try:
                results.append(status(lab, second))
            except OSError as exc:
                results.append(repr(exc))
            time.sleep(0.05)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        env = {**lab.env, **approle(lab, "gpunode-rotate", ROTATE_POLICY)}
        proc = gpunode(
            "rotate", INVENTORY, f"gateway.clients.{door.CLIENT}", "--generate", env=env,
            timeout=900,
        )  # fmt: skip
        time.sleep(1)
    finally:
        stop.set()
        thread.join()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out

    new_key, new_version = key_in_vault(lab, door.CLIENT_PATH)
    assert new_version == old_version + 1 and new_key != old_key
    assert f"gateway.clients.{door.CLIENT}: wrote version {new_version} of" in out
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("lab-01: "))
    assert line.startswith(f"lab-01: version {new_version}: healthy: haproxy.service active"), out
    assert f"with key version {new_version} from the controller: 200" in line, out
    assert not any(ln.startswith("lab-02") for ln in proc.stdout.splitlines())  # no gateway
    assert new_key not in out and old_key not in out

    # what clients see: the old key is refused, the new one passes, the other one never failed
    assert status(lab, old_key) == 401
    assert status(lab, new_key) == 200
    assert len(results) >= 10, results
    failed = [r for r in results if r != 200]
    assert not failed, f"{len(failed)} of {len(results)} failed: {failed[:5]}"

    # the node holds the new key's digest, never a key: its files and its journal are searched
    # for both keys, read from stdin into bash (never on a command line)
    keys_map = lab.ssh("lab-01", f"cat {KEYS_MAP}", check=True).stdout
    assert f"{key_digest(new_key)} {door.CLIENT}" in keys_map.splitlines()
    assert key_digest(old_key) not in keys_map
    search = (
        'IFS= read -r a; IFS= read -r b; keys() { printf "%s\\n%s\\n" "$a" "$b"; }; '
        "grep -rlsF -D skip -f <(keys) /etc /var/log /var/lib /tmp; "
        "journalctl --no-pager -o cat | grep -cF -f <(keys) || true"
    )
    found = lab.ssh("lab-01", f"bash -c {shlex.quote(search)}", input=f"{new_key}\n{old_key}\n")
    assert found.stdout.strip() == "0", found.stdout + found.stderr
