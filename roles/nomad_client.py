"""Nomad client role: the Nomad agent that runs inference services as Nomad jobs.

HashiCorp's package repository (or a mirror of it) with its signing key pinned: the
keyring must hold exactly the key in ``gpunode.nomad.HASHICORP_KEY_FINGERPRINTS``,
checked on every run (a keyring with another key stops the host before the repository
file is written); Nomad pinned to ``nomad.version``; the NVIDIA device plugin
(``nomad-device-nvidia``) from its release zip checked by sha256; the client config
(datacenter, servers, mutual TLS, ACLs, Vault for workload identity, plugins); a
hardened systemd unit in place of the package's. Its ports are opened to
``network.cluster_cidrs`` by the firewall role (``gpunode.nomad.cluster_ports``).
Everything it reads is in ``NodeConfig.nomad`` (gpunode/nomad.py); distro
differences are the table ``REPO`` below.

.. code:: python

    from roles.nomad_client import nomad_client
    nomad_client()
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt, dnf, files, server, systemd
from pyinfra.operations.util import any_changed

from gpunode import nomad as hashicorp
from gpunode.inventory import node_and_distro
from gpunode.operations.keys import pinned_keyring
from gpunode.operations.packages import apt_update
from gpunode.operations.server import notice
from gpunode.paths import template
from gpunode.provenance import record
from gpunode.schema import distros
from gpunode.schema.node import NodeConfig
from gpunode.schema.nomad import HTTP_PORT, RPC_PORT, SERF_PORT


@deploy("gpunode nomad client")
def nomad_client() -> None:
    config, spec = node_and_distro(host)
    if not config.nomad.enabled:
        return
    repo = hashicorp.REPO[spec.family]
    repo_url = (config.nomad.repo_url or repo.default_url).rstrip("/")

    if repo_url.startswith("http://"):
        notice(
            name="Warning: HashiCorp repository over plain http (nomad.repo_url_allow_http)",
            message="packages are checked against the pinned key; the transport is not private",
        )
    # HashiCorp's signing key, pinned: a keyring holding any other key stops the host here.
    key = pinned_keyring(
        what="HashiCorp signing key",
        src=f"{repo_url}/{hashicorp.HASHICORP_KEY}",
        path=repo.keyring,
        fingerprints=hashicorp.HASHICORP_KEY_FINGERPRINTS,
        family=spec.family,
    )
    if key is None:
        return
    if spec.family == "apt":
        _apt_repo(config, spec, repo, repo_url)
    else:
        files.template(
            name="HashiCorp dnf repository",
            src=template("nomad", repo.template),
            dest=repo.repo_file,
            mode="644",
            repo=repo_url,
            gpgkey=f"file://{repo.keyring}",
            user="root",
            group="root",
        )
        dnf.packages(name="Nomad (pinned)", packages=["unzip", repo.package(config.nomad.version)])

    _device_plugin(config)
    conf = files.template(
        name="Nomad client configuration",
        src=template("nomad/client.hcl.j2"),
        dest=f"{config.nomad.config_dir}/{hashicorp.CONFIG_FILE}",
        mode="640",
        user="root",
        group="root",
        nomad=config.nomad,
        plugin_dir=hashicorp.plugin_dir(config),
        ports={"http": HTTP_PORT, "rpc": RPC_PORT, "serf": SERF_PORT},
    )
    files.directory(
        name="Nomad data directory",
        path=config.nomad.data_dir,
        mode="711",
        user="root",
        group="root",
    )
    unit = files.template(
        name="Nomad systemd unit (hardened)",
        src=template("nomad/nomad.service.j2"),
        dest=hashicorp.UNIT_FILE,
        mode="644",
        config_dir=config.nomad.config_dir,
        config_file=f"{config.nomad.config_dir}/{hashicorp.CONFIG_FILE}",
        data_dir=config.nomad.data_dir,
        user="root",
        group="root",
    )
    systemd.daemon_reload(name="Reload systemd units", _if=unit.did_change)
    systemd.service(name="Nomad running", service="nomad.service", running=True, enabled=True)
    systemd.service(
        name="Restart Nomad",
        service="nomad.service",
        restarted=True,
        _if=any_changed(conf, unit),
    )
    record(
        "nomad",
        {
            "version": config.nomad.version,
            "device_plugin": config.nomad.device_plugin.version
            if config.nomad.device_plugin.enabled
            else None,
            "device_plugin_sha256": config.nomad.device_plugin.sha256,
        },
    )


def _apt_repo(
    config: NodeConfig, spec: distros.DistroSpec, repo: hashicorp.RepoSpec, repo_url: str
) -> None:
    sources = files.template(
        name="HashiCorp apt repository",
        src=template("nomad", repo.template),
        dest=repo.repo_file,
        mode="644",
        repo=repo_url,
        keyring=repo.keyring,
        codename=spec.codename,
        user="root",
        group="root",
    )
    installed = host.get_fact(DebPackages)
    if repo.package(config.nomad.version).split("=", 1)[1] not in installed.get("nomad", ()):
        apt_update(name="Refresh apt package lists")  # the pinned version is to be installed
    else:
        apt_update(name="Refresh apt package lists", _if=sources.did_change)
    apt.packages(
        name="Nomad (pinned)",
        packages=["unzip", repo.package(config.nomad.version)],
        no_recommends=True,
        allow_downgrades=True,
    )


def _device_plugin(config: NodeConfig) -> None:
    plugin = config.nomad.device_plugin
    if not plugin.enabled:
        return
    assert plugin.sha256 is not None  # checked at config load
    zip_path = f"{hashicorp.STATE_DIR}/nomad-device-nvidia_{plugin.version}.zip"
    files.directory(
        name="gpunode Nomad state directory",
        path=hashicorp.STATE_DIR,
        mode="700",
        user="root",
        group="root",
    )
    files.directory(
        name="Nomad plugin directory",
        path=hashicorp.plugin_dir(config),
        mode="755",
        user="root",
        group="root",
    )
    download = files.download(
        name="NVIDIA device plugin release",
        src=plugin.release_url(),
        dest=zip_path,
        sha256sum=plugin.sha256,
        mode="600",
    )
    server.shell(
        name="Unpack the NVIDIA device plugin",
        commands=[f"unzip -o -q {zip_path} nomad-device-nvidia -d {hashicorp.plugin_dir(config)}"],
        _if=download.did_change,
    )
    files.file(
        name="NVIDIA device plugin binary",
        path=f"{hashicorp.plugin_dir(config)}/nomad-device-nvidia",
        mode="755",
        user="root",
        group="root",
    )
