"""The monitoring section and role (gpunode/monitoring.py, roles/monitoring.py), and the
example Prometheus configuration and alert rules under monitoring/.

The role runs through pyinfra's real API against the ``@fake`` connector (the harness of
tests/unit/harness.py): a fresh host answers nothing, so everything is installed.
The lab runs it for real on Debian 12 (tests/lab/test_drift.py); dcgm-exporter needs
NVIDIA's repository and a GPU, so it is covered here only.

GPU answers: the PCI lines of the ``NvidiaHost`` fact (gpunode/facts/nvidia.py, the one PCI
GPU fact) for an H100 SXM5 (class 0x0302, device 0x2330) and an NVSwitch (class 0x0680).

promtool is Debian's own (package ``prometheus``, same version as the distro's Prometheus):
the test extracts just that binary from the package (``apt-get download``, verified by apt)
into /var/cache/gpunode/promtool, once.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyinfra
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from harness import RecordingFakeConnector, _free_port, find_promtool, host_info_output
from jinja2 import UndefinedError
from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.operations import run_ops
from pyinfra.api.util import get_template

from gpunode.config import load
from gpunode.facts.nvidia import NvidiaHost
from gpunode.facts.server import HostInfo
from gpunode.gateway import CERT_FILE
from gpunode.monitoring import metrics_ports
from gpunode.paths import REPO_ROOT
from gpunode.schema.gateway import Gateway
from gpunode.schema.node import NodeConfig
from gpunode.schema.types import ConfigError
from roles.monitoring import monitoring

MONITORING = REPO_ROOT / "monitoring"

H100 = "pci=0000:1b:00.0 0x030200 0x2330"
NVSWITCH = "pci=0000:05:00.0 0x068000 0x22a3"


# --- promtool ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def promtool() -> str:
    return find_promtool()


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], cwd=MONITORING, capture_output=True, text=True, timeout=60
    )


def test_example_prometheus_config_is_valid(promtool: str) -> None:
    proc = run_promtool(promtool, "check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rule files found" in proc.stdout


def test_alert_rules_are_valid_and_fire_when_they_should(promtool: str) -> None:
    check = run_promtool(promtool, "check", "rules", "gpunode-alerts.yml")
    assert check.returncode == 0, check.stdout + check.stderr
    names = re.findall(
        r"^\s+- alert: (\S+)$", (MONITORING / "gpunode-alerts.yml").read_text(), re.M
    )
    for wanted in (
        "GpuXidError",
        "GpuUncorrectableEccErrors",
        "InferenceDown",
        "DriftDetected",
        "DriftRunFailing",
    ):
        assert wanted in names
    # each alert is exercised by the promtool unit test, firing and not firing
    tests = (MONITORING / "tests" / "alerts-test.yml").read_text()
    for wanted in (
        "GpuXidError",
        "GpuUncorrectableEccErrors",
        "InferenceDown",
        "DriftDetected",
        "DriftRunFailing",
        "DriftRunStale",
    ):
        assert tests.count(f"alertname: {wanted}") >= 1, wanted
    run = run_promtool(promtool, "test", "rules", "tests/alerts-test.yml")
    assert run.returncode == 0, run.stdout + run.stderr


def test_promtool_catches_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    # the checks above can fail: a rule with a bad expression is refused
    bad = (
        (MONITORING / "gpunode-alerts.yml")
        .read_text()
        .replace("gpunode_drift_operations > 0", "gpunode_drift_operations >")
    )
    (tmp_path / "rules.yml").write_text(bad)
    proc = subprocess.run(
        [promtool, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, timeout=60
    )
    assert proc.returncode != 0


# --- the section ---------------------------------------------------------------------------


def config(distro: str = "debian12", port: int = 22, **monitoring_: Any) -> NodeConfig:
    raw = {
        # the firewall (on by default) is the firewall role's: not this role's concern
        "defaults": {"distro": distro, "monitoring": monitoring_, "firewall": {"enabled": False}},
        "hosts": {"gpu-01": {"connection": {"address": "192.0.2.10", "port": port}}},
    }
    return load(raw, source="test_monitoring").hosts["gpu-01"].config


def test_metrics_ports_default_and_switched_off() -> None:
    assert metrics_ports(config()) == [("tcp", 9100), ("tcp", 9400)]
    assert metrics_ports(config(dcgm_exporter=False)) == [("tcp", 9100)]
    assert metrics_ports(config(node_exporter=False, dcgm_exporter_port=9500)) == [("tcp", 9500)]
    assert metrics_ports(config(node_exporter=False, dcgm_exporter=False)) == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"dcgm_exporter_port": 9100},
            "host gpu-01: monitoring.dcgm_exporter_port: 9100 is already "
            "monitoring.node_exporter_port (allowed: two different ports)",
        ),
        (
            {"node_exporter_port": 2222, "port": 2222},
            "host gpu-01: monitoring.node_exporter_port: 2222 is the SSH port",
        ),
        ({"node_exporter_port": 70000}, "monitoring.node_exporter_port"),
        ({"textfile_dir": "relative/dir"}, "monitoring.textfile_dir"),
        ({"textfile_dir": "/var/lib/x;rm -rf /"}, "monitoring.textfile_dir"),
        ({"dcgm_exporter": "sometimes"}, "monitoring.dcgm_exporter"),
    ],
)
def test_bad_monitoring_settings_fail_at_load(settings: dict[str, Any], message: str) -> None:
    port = settings.pop("port", 22)
    with pytest.raises(ConfigError) as err:
        config(port=port, **settings)
    assert message in str(err.value)


def test_gpu_count_fact_counts_gpus_not_nvswitches() -> None:
    fact = NvidiaHost()
    assert len(fact.process([H100, H100.replace("1b:00.0", "29:00.0"), NVSWITCH])["gpus"]) == 2
    assert len(fact.process([])["gpus"]) == 0
    # the command itself, run here on this machine's sysfs: no NVIDIA GPU
    out = subprocess.run(["sh", "-c", fact.command()], capture_output=True, text=True)
    assert out.returncode == 0
    assert len(fact.process(out.stdout.splitlines())["gpus"]) == 0


# --- the role ------------------------------------------------------------------------------


def run_monitoring(node: NodeConfig, pci: list[str], os_release: str = "debian12"):
    assert not pyinfra.is_cli
    responses: dict[Any, Any] = {
        NvidiaHost().command(): pci,
        HostInfo().command(): list(host_info_output(os_release)),
    }
    data = {"gpunode": node, "fake_delay": 0, "fake_delay_jitter": 0, "fake_responses": responses}
    inventory = Inventory(([("@fake/gpu-01", data)], {}))
    for host in inventory:
        host.connector_cls = RecordingFakeConnector
    state = State(inventory, Config())
    host = inventory.get_host("@fake/gpu-01")
    connect_all(state)
    add_deploy(state, monitoring)
    run_ops(state)
    connector = host.connector
    assert isinstance(connector, RecordingFakeConnector)
    names = sorted(n for meta in state.op_meta.values() for n in meta.names)
    return list(connector.executed_commands), dict(connector.uploads), names


def installs(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\b(apt-get|dnf)\b.*\binstall\b", c)]


def test_node_exporter_reads_the_textfile_directory_no_gpu_no_dcgm() -> None:
    commands, uploads, names = run_monitoring(config(), pci=[])
    assert any("mkdir -p /var/lib/gpunode/textfile" in c for c in commands)
    assert any("chmod 755 /var/lib/gpunode/textfile" in c for c in commands)
    (install,) = installs(commands)
    assert "prometheus-node-exporter" in install and "--no-install-recommends" in install
    flags = uploads["/etc/default/prometheus-node-exporter"]
    assert re.search(
        r'^ARGS="--web.listen-address=:9100 '
        r'--collector.textfile.directory=/var/lib/gpunode/textfile"$',
        flags,
        re.M,
    )
    assert any("systemctl enable prometheus-node-exporter.service" in c for c in commands)
    assert any("systemctl start prometheus-node-exporter.service" in c for c in commands)
    assert not any("dcgm" in c for c in commands)
    assert "gpunode monitoring | dcgm-exporter" in names  # the visible skip


def test_dcgm_exporter_on_a_gpu_node() -> None:
    commands, uploads, _ = run_monitoring(config(dcgm_exporter_port=9401), pci=[H100, NVSWITCH])
    assert any("datacenter-gpu-manager-exporter" in c for c in installs(commands))
    dropin = uploads["/etc/systemd/system/nvidia-dcgm-exporter.service.d/50-gpunode.conf"]
    assert "[Service]\nEnvironment=DCGM_EXPORTER_LISTEN=:9401" in dropin
    assert any(c.strip().endswith("systemctl daemon-reload") for c in commands)
    assert any("systemctl start nvidia-dcgm-exporter.service" in c for c in commands)
    assert any("systemctl enable nvidia-dcgm-exporter.service" in c for c in commands)


def test_dcgm_exporter_forced_off_and_on() -> None:
    off, _, _ = run_monitoring(config(dcgm_exporter=False), pci=[H100])
    assert not any("dcgm" in c for c in off)
    on, _, _ = run_monitoring(config(dcgm_exporter=True, node_exporter=False), pci=[])
    assert any("datacenter-gpu-manager-exporter" in c for c in installs(on))
    assert not any("prometheus-node-exporter" in c for c in on)


def test_el9_skips_node_exporter_visibly_and_installs_dcgm_with_dnf() -> None:
    commands, uploads, names = run_monitoring(config("rocky9"), pci=[H100], os_release="rocky9")
    assert "gpunode monitoring | node_exporter" in names
    assert not any("node-exporter" in c for c in commands)
    (install,) = installs(commands)
    assert install.startswith("dnf") and "datacenter-gpu-manager-exporter" in install
    assert "/etc/systemd/system/nvidia-dcgm-exporter.service.d/50-gpunode.conf" in uploads


# --- the gateway: alert rules against HAProxy 2.6's real metrics ---------------------------
#
# tests/unit/fixtures/haproxy-2.6-metrics.txt is a real scrape of Debian 12's HAProxy
# (2.6.12) exporter, from the configuration of ``haproxy_config`` below (frontends
# "gateway" and "metrics", backends svc_chat with a live server and svc_embed with a dead
# one) after 200, 404, 404, 429, 401 and 503 answers.

HAPROXY_FIXTURE = Path(__file__).parent / "fixtures" / "haproxy-2.6-metrics.txt"
GATEWAY_ALERTS = (
    "GatewayDown",
    "GatewayHigh5xxRatio",
    "GatewayHigh429Ratio",
    "GatewayBackendDown",
    "GatewayCertificateMissing",
    "GatewayCertificateExpired",
    "GatewayCertificateExpiresSoon",
    "GatewayCertificateCheckStale",
)


def metric_names(exposition: str) -> set[str]:
    return set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", exposition, re.M))


def gateway_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((MONITORING / "gpunode-alerts.yml").read_text())
    (group,) = [g for g in doc["groups"] if g["name"] == "gpunode-gateway"]
    return list(group["rules"])


def test_gateway_alerts_exist_and_each_fires_in_the_promtool_test() -> None:
    assert [r["alert"] for r in gateway_rules()] == list(GATEWAY_ALERTS)
    tests = yaml.safe_load((MONITORING / "tests" / "alerts-test.yml").read_text())["tests"]
    fired = {
        case["alertname"]
        for group in tests
        for case in group["alert_rule_test"]
        if case.get("exp_alerts")
    }
    quiet = {
        case["alertname"]
        for group in tests
        for case in group["alert_rule_test"]
        if not case.get("exp_alerts")
    }
    assert set(GATEWAY_ALERTS) <= fired
    # every alert but the two that fire at once is also shown quiet
    assert set(GATEWAY_ALERTS) - {"GatewayCertificateMissing"} <= quiet
    severity = {r["alert"]: r["labels"]["severity"] for r in gateway_rules()}
    assert severity["GatewayCertificateExpired"] == severity["GatewayBackendDown"] == "critical"
    assert severity["GatewayCertificateExpiresSoon"] == severity["GatewayHigh429Ratio"] == "warning"
    # promtool runs these cases in test_alert_rules_are_valid_and_fire_when_they_should


def test_gateway_rules_use_haproxy_2_6_metric_names() -> None:
    fixture = HAPROXY_FIXTURE.read_text()
    assert re.search(r'^haproxy_process_build_info\{version="2\.6\.', fixture, re.M)
    exprs = " ".join(str(r["expr"]) for r in gateway_rules())
    used = set(re.findall(r"\bhaproxy_[a-z0-9_]+", exprs))
    assert used >= {
        "haproxy_frontend_http_responses_total",
        "haproxy_frontend_http_requests_total",
        "haproxy_frontend_requests_denied_total",
        "haproxy_server_status",
    }
    assert used <= metric_names(fixture), used - metric_names(fixture)
    # and the label values the rules match on
    assert re.search(
        r'^haproxy_frontend_http_responses_total\{proxy="gateway",code="5xx"\} ', fixture, re.M
    )
    assert re.search(
        r'^haproxy_server_status\{proxy="svc_embed",server="embed",state="DOWN"\} 1$', fixture, re.M
    )
    assert re.search(
        r'^haproxy_frontend_requests_denied_total\{proxy="metrics"\} 0$', fixture, re.M
    )


def test_a_renamed_metric_fails_the_name_check() -> None:
    # the check above can fail: a name HAProxy 2.6 does not export is not in the fixture
    names = metric_names(HAPROXY_FIXTURE.read_text())
    assert "haproxy_frontend_http_responses_total" in names
    assert "haproxy_frontend_http_responses_5xx_total" not in names
    assert "haproxy_server_up" not in names


def find_haproxy() -> str:
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("haproxy (Debian package haproxy, `make deps`) is needed under CI=true")
    pytest.skip("haproxy not installed (under CI=true this is a failure)")


def haproxy_config(gateway: int, metrics: int, live: int, dead: int) -> str:
    return f"""\
global
    log stderr format raw local0 err
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend gateway
    bind 127.0.0.1:{gateway}
    http-request return status 200 content-type text/plain string ok if {{ path /health }}
    http-request deny deny_status 429 hdr Retry-After 1 if {{ path /limited }}
    http-request return status 401 if {{ path /nokey }}
    use_backend svc_chat if {{ path_beg /v1/ }}
    default_backend svc_embed
frontend metrics
    bind 127.0.0.1:{metrics}
    http-request use-service prometheus-exporter if {{ path /metrics }}
    no log
backend svc_chat
    option httpchk GET /
    server chat 127.0.0.1:{live} check inter 200ms
backend svc_embed
    option httpchk GET /
    server embed 127.0.0.1:{dead} check inter 200ms
"""


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback http
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_real_haproxy_counts_what_the_rules_read(tmp_path: Path) -> None:
    """The rules' assumptions, on the real HAProxy: 429 by ``deny`` counts as denied, 401 by
    ``return`` does not; a dead backend's 503 is a 5xx; its server is state DOWN; the names
    the rules use are exported."""
    haproxy = find_haproxy()
    backend = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    gateway, metrics, dead = _free_port(), _free_port(), _free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(gateway, metrics, backend.server_address[1], dead))
    proc = subprocess.Popen(
        [haproxy, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 15
        scrape = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=2) as r:  # noqa: S310
                    scrape = r.read().decode()
            except OSError:
                scrape = ""
            if re.search(
                r'^haproxy_server_status\{proxy="svc_embed",server="embed",state="DOWN"\} 1$',
                scrape,
                re.M,
            ) and re.search(
                r'^haproxy_server_status\{proxy="svc_chat",server="chat",state="UP"\} 1$',
                scrape,
                re.M,
            ):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"haproxy did not settle: {scrape[-2000:]}")
        base = f"http://127.0.0.1:{gateway}"
        answers = [
            _get(base + p) for p in ("/health", "/v1/x", "/limited", "/limited", "/nokey", "/other")
        ]
        assert answers == [200, 200, 429, 429, 401, 503]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:  # noqa: S310
            scrape = r.read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        backend.shutdown()

    def value(series: str) -> float:
        found = re.search(rf"^{re.escape(series)} (\S+)$", scrape, re.M)
        assert found, series
        return float(found[1])

    assert value('haproxy_frontend_requests_denied_total{proxy="gateway"}') == 2  # the 429s
    assert value('haproxy_frontend_http_requests_total{proxy="gateway"}') == 6
    assert value('haproxy_frontend_http_responses_total{proxy="gateway",code="4xx"}') == 3
    assert value('haproxy_frontend_http_responses_total{proxy="gateway",code="5xx"}') == 1
    assert value('haproxy_frontend_requests_denied_total{proxy="metrics"}') == 0
    exprs = " ".join(str(r["expr"]) for r in gateway_rules())
    assert set(re.findall(r"\bhaproxy_[a-z0-9_]+", exprs)) <= metric_names(scrape)
    # the fixture is this HAProxy's: same names
    assert metric_names(scrape) == metric_names(HAPROXY_FIXTURE.read_text())


def test_example_prometheus_config_scrapes_the_gateway() -> None:
    doc = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = [j for j in doc["scrape_configs"] if j["job_name"] == "gateway"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets and all(t.endswith(":8405") for t in targets)
    assert Gateway().metrics_port == 8405


# --- the gateway certificate's expiry metric (templates/gateway/gpunode-gateway-cert.*) ----

CERT_UNIT_DIR = REPO_ROOT / "templates" / "gateway"
CERT_UNIT_EXPOSURE = 1.0  # systemd-analyze security --offline, at most (measured: 0.9)


def render_cert_units(out: Path, cert_file: str, textfile_dir: str) -> tuple[Path, Path]:
    """Both units, rendered the way the role's files.template renders them."""
    paths = []
    for name in ("gpunode-gateway-cert.service", "gpunode-gateway-cert.timer"):
        text = get_template(str(CERT_UNIT_DIR / name)).render(
            cert_file=cert_file, textfile_dir=textfile_dir
        )
        (out / name).write_text(text)
        paths.append(out / name)
    return paths[0], paths[1]


def exec_start_argv(unit: str) -> list[str]:
    """ExecStart= of a unit as systemd runs it: continuation lines joined, ``$$`` and
    ``%%`` unescaped (no other specifier, variable or backslash escape allowed in it)."""
    joined = re.sub(r"\\\n", " ", unit)
    (value,) = re.findall(r"^ExecStart=(.*)$", joined, re.M)
    rest = re.sub(r"%%|\$\$", "", value)
    assert "%" not in rest and "$" not in rest and "\\" not in rest, rest
    return shlex.split(value.replace("%%", "%").replace("$$", "$"))


def run_cert_unit(tmp_path: Path, cert: Path, textfile: Path) -> subprocess.CompletedProcess[str]:
    service, _ = render_cert_units(tmp_path, str(cert), str(textfile))
    argv = exec_start_argv(service.read_text())
    # systemd's own PATH for services
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def make_gateway_pem(path: Path, not_before: datetime, not_after: datetime) -> str:
    """A leaf certificate signed by a CA, its chain and its key, in one file (what HAProxy
    reads); returns the key's PEM."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before - timedelta(days=1))
        .not_valid_after(not_after + timedelta(days=365))  # later than the leaf's
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpu-01")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("gpu-01")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    pem = leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(
        serialization.Encoding.PEM
    )
    path.write_bytes(pem + key_pem.encode())
    path.chmod(0o600)
    return key_pem


def read_prom(path: Path) -> dict[str, int]:
    return {
        m[1]: int(m[2])
        for m in re.finditer(r"^(gpunode_gateway_\w+) (\S+)$", path.read_text(), re.M)
    }


@pytest.fixture
def textfile(tmp_path: Path) -> Path:
    # every character an AbsPath allows, besides letters and digits
    out = tmp_path / "text+@:,=-file_dir.d"
    out.mkdir()
    return out


def test_cert_unit_exports_the_leaf_certificates_dates(
    tmp_path: Path, textfile: Path, promtool: str
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    cert = tmp_path / "tls" / "gateway.pem"
    cert.parent.mkdir()
    key_pem = make_gateway_pem(cert, now - timedelta(seconds=30), now + timedelta(hours=72))
    # a previous run's file is replaced
    (textfile / "gpunode_gateway.prom").write_text("stale 1\n")
    before = int(time.time())
    proc = run_cert_unit(tmp_path, cert, textfile)
    after = int(time.time())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    prom = textfile / "gpunode_gateway.prom"
    assert read_prom(prom) == {
        "gpunode_gateway_certificate_expiry_timestamp_seconds": int(
            (now + timedelta(hours=72)).timestamp()
        ),
        "gpunode_gateway_certificate_not_before_timestamp_seconds": int(
            (now - timedelta(seconds=30)).timestamp()
        ),
        "gpunode_gateway_certificate_check_timestamp_seconds": read_prom(prom)[
            "gpunode_gateway_certificate_check_timestamp_seconds"
        ],
    }
    assert before <= read_prom(prom)["gpunode_gateway_certificate_check_timestamp_seconds"] <= after
    # node_exporter (user prometheus) reads it; nothing else is left in the directory
    assert prom.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in textfile.iterdir()) == ["gpunode_gateway.prom"]
    # the key is printed nowhere
    body = key_pem.splitlines()[1]
    assert "PRIVATE" not in prom.read_text() and body not in prom.read_text()
    # valid exposition format, as node_exporter's textfile collector reads it
    lint = subprocess.run(
        [promtool, "check", "metrics"], input=prom.read_text(), capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.mark.parametrize(
    "content",
    [
        None,
        b"",
        b"not a certificate\n",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ],
)
def test_cert_unit_exports_0_when_the_certificate_cannot_be_read(
    tmp_path: Path, textfile: Path, content: bytes | None
) -> None:
    cert = tmp_path / "gateway.pem"
    if content is not None:
        cert.write_bytes(content)
    proc = run_cert_unit(tmp_path, cert, textfile)
    assert proc.returncode == 1  # the unit fails, and the alert fires
    assert f"cannot read the certificate in {cert}: its expiry is exported as 0" in proc.stderr
    assert "AAAA" not in proc.stderr + proc.stdout
    values = read_prom(textfile / "gpunode_gateway.prom")
    assert values["gpunode_gateway_certificate_expiry_timestamp_seconds"] == 0
    assert values["gpunode_gateway_certificate_not_before_timestamp_seconds"] == 0
    assert values["gpunode_gateway_certificate_check_timestamp_seconds"] > 0
    assert sorted(p.name for p in textfile.iterdir()) == ["gpunode_gateway.prom"]


def test_cert_unit_fails_without_its_directory(tmp_path: Path) -> None:
    cert = tmp_path / "gateway.pem"
    make_gateway_pem(cert, datetime.now(UTC), datetime.now(UTC) + timedelta(hours=1))
    proc = run_cert_unit(tmp_path, cert, tmp_path / "missing")
    assert proc.returncode == 1
    assert not (tmp_path / "missing").exists()


def test_cert_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze (package systemd) is needed for these checks")
    service, timer = render_cert_units(
        tmp_path, "/etc/haproxy/gpunode/tls/gateway.pem", "/var/lib/gpunode/textfile"
    )
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(timer), str(service)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    # systemd-analyze verify exits 0 on unknown keys, only warning: any output is a failure
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    exposure = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(service)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", exposure.stdout)
    assert score, exposure.stdout + exposure.stderr
    assert float(score[1]) <= CERT_UNIT_EXPOSURE


def test_cert_units_schedule_and_sandbox(tmp_path: Path) -> None:
    service, timer = render_cert_units(tmp_path, CERT_FILE, "/var/lib/gpunode/textfile")
    text = service.read_text()
    argv = exec_start_argv(text)
    assert argv[0] == "/bin/sh" and argv[-2:] == [CERT_FILE, "/var/lib/gpunode/textfile"]
    # openssl reads dates only (never -text, never the key)
    assert re.findall(r"openssl x509 -noout -(\w+) ", argv[2]) == ["startdate", "enddate"]
    for line in (
        "Type=oneshot",
        "User=root",
        "CapabilityBoundingSet=CAP_DAC_READ_SEARCH",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/gpunode/textfile",
        "PrivateTmp=yes",
        "PrivateNetwork=yes",
    ):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert len(re.findall(r"^ReadWritePaths=", text, re.M)) == 1
    assert "AmbientCapabilities" not in text
    schedule = timer.read_text()
    assert re.search(r"^OnBootSec=\S+$", schedule, re.M)
    assert re.search(r"^OnUnitActiveSec=15min$", schedule, re.M)
    assert re.search(r"^RandomizedDelaySec=30s$", schedule, re.M)
    assert re.search(r"^WantedBy=timers.target$", schedule, re.M)
    # the role renders them with these two values; without one, rendering stops
    with pytest.raises(UndefinedError):
        get_template(str(CERT_UNIT_DIR / "gpunode-gateway-cert.service")).render(
            cert_file=CERT_FILE
        )


# --- the gateway's host checks (tests/host/test_gateway.py): their parsers on real output ---


def host_checks() -> Any:
    path = REPO_ROOT / "tests" / "host" / "test_gateway.py"
    spec = importlib.util.spec_from_file_location("host_test_gateway", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_host_check_parsers_on_real_ss_and_openssl_output(tmp_path: Path) -> None:
    checks = host_checks()
    # ss: this machine's listeners, with one of ours on 127.0.0.1, plus the other
    # spellings ss writes (wildcards, IPv6 in brackets, an interface scope)
    with socket.socket() as v4:
        v4.bind(("127.0.0.1", 0))
        v4.listen()
        port = v4.getsockname()[1]
        out = subprocess.run(["ss", "-Htln"], capture_output=True, text=True, check=True)
    found = checks.listeners(out.stdout)
    assert ("127.0.0.1", port) in found
    assert all(isinstance(p, int) for _, p in found)
    sample = (
        "LISTEN 0      128       0.0.0.0:2024  0.0.0.0:*\n"
        "LISTEN 0      4096         [::]:8443     [::]:*\n"
        "LISTEN 0      4096            *:8405        *:*\n"
        "LISTEN 0      4096        [::1]:8000     [::]:*\n"
        "LISTEN 0      4096  127.0.0.1%lo:8001  0.0.0.0:*\n"
    )
    assert checks.listeners(sample) == [
        ("0.0.0.0", 2024),  # noqa: S104 - ss output, not a bind
        ("::", 8443),
        ("*", 8405),
        ("::1", 8000),
        ("127.0.0.1", 8001),
    ]
    loopback = [checks.is_loopback(a) for a, _ in checks.listeners(sample)]
    assert loopback == [False, False, False, True, True]
    assert checks.connect_address(["*"]) == checks.connect_address(["0.0.0.0"]) == "127.0.0.1"  # noqa: S104
    assert checks.connect_address(["::"]) == "::1"
    assert checks.connect_address(["192.0.2.10"]) == "192.0.2.10"
    assert checks.url_host("::1") == "[::1]"
    # openssl: a certificate's names and dates, as the checks read them
    now = datetime.now(UTC).replace(microsecond=0)
    cert = tmp_path / "gateway.pem"
    make_gateway_pem(cert, now - timedelta(seconds=30), now + timedelta(hours=72))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpu-01")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpu-01")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(seconds=30))
        .not_valid_after(now + timedelta(hours=72))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("gpu-01"),
                    x509.DNSName("gpu-01.example.com"),
                    x509.IPAddress(ipaddress.ip_address("192.0.2.10")),
                    x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "san.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))

    def openssl(*args: str, pem: Path = cert) -> str:
        proc = subprocess.run(
            ["openssl", "x509", "-noout", *args, "-in", str(pem)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    dns, ips = checks.subject_alt_names(openssl("-ext", "subjectAltName", pem=tmp_path / "san.pem"))
    assert dns == {"gpu-01", "gpu-01.example.com"}
    assert ips == {"192.0.2.10", "2001:db8::1"}
    not_before, not_after = checks.openssl_dates(openssl("-startdate", "-enddate"))
    assert (not_before, not_after) == (
        int((now - timedelta(seconds=30)).timestamp()),
        int((now + timedelta(hours=72)).timestamp()),
    )
    # a 72h certificate must have 18h left; a 90-day one 7 days
    margin = checks.expiry_margin_s(not_before, not_after)
    assert margin == (72 * 3600 + 30) // 4
    assert checks.expiry_margin_s(0, 90 * 86400) == 7 * 86400
    assert (
        subprocess.run(
            ["openssl", "x509", "-noout", "-checkend", str(margin), "-in", str(cert)],
            capture_output=True,
        ).returncode
        == 0
    )
    assert (
        subprocess.run(
            ["openssl", "x509", "-noout", "-checkend", str(73 * 3600), "-in", str(cert)],
            capture_output=True,
        ).returncode
        == 1
    )
    assert openssl("-subject", "-nameopt", "RFC2253").strip() == "subject=CN=gpu-01"
    # the unit's .prom file, as the expiry check reads it
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    assert run_cert_unit(tmp_path, cert, textfile).returncode == 0
    values = checks.prom_values((textfile / "gpunode_gateway.prom").read_text())
    assert values["gpunode_gateway_certificate_expiry_timestamp_seconds"] == not_after


def test_haproxy_config_answers_429_only_by_deny() -> None:
    """GatewayHigh429Ratio reads haproxy_frontend_requests_denied_total: HAProxy 2.6 counts
    ``http-request deny`` there (test_real_haproxy_counts_what_the_rules_read), not
    ``http-request return``. So the gateway's template answers every 429 with ``deny
    deny_status 429`` (same body and headers as ``return``) and nothing else with a deny."""
    text = (REPO_ROOT / "templates" / "gateway" / "haproxy.cfg.j2").read_text()
    rules = [line.strip() for line in text.splitlines() if "http-request" in line]
    limits = [r for r in rules if re.search(r"\b429\b", r)]
    assert limits, "no 429 in templates/gateway/haproxy.cfg.j2"
    assert all(r.startswith("http-request deny deny_status 429 ") for r in limits), limits
    others = [r for r in rules if re.match(r"http-request (deny|tarpit|silent-drop)\b", r)]
    assert others == limits
