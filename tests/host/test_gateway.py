"""Checks for roles/gateway.py: HAProxy in front of the node's inference services.

Skipped as a whole on a node whose ``gateway.enabled`` is false (configuration, not a gap
of the host). The certificate file holds the private key: it is read as root, by
``openssl`` printing dates, names and serials only, and nothing read from it or from the
journal is put in an assertion message but those.

The certificate may expire within 7 days: its lifetime is ``gateway.tls.ttl`` (72h by
default) and it is renewed when less than a third of it is left (on a deploy and on the
drift run). What must hold is what the GatewayCertificateExpiresSoon alert says
(monitoring/gpunode-alerts.yml): more than a quarter of its lifetime left, or 7 days,
whichever is less.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from datetime import UTC, datetime

import pytest

from gpunode import gateway as front
from gpunode.schema.node import Host
from gpunode.schema.runtimes import PROFILES

CERT_SERVICE = "gpunode-gateway-cert.service"
CERT_TIMER = "gpunode-gateway-cert.timer"
PROM_FILE = "gpunode_gateway.prom"
WEEK_S = 7 * 86400


# --- pure helpers (unit-tested in tests/unit/test_monitoring.py on real command output) ----


def listeners(ss_output: str) -> list[tuple[str, int]]:
    """(address, port) of each TCP listener in ``ss -Htln[p]`` output; a wildcard is "*",
    "0.0.0.0" or "::" as ss writes it, an IPv6 address without brackets or zone."""
    found = []
    for line in ss_output.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        address, _, port = fields[3].rpartition(":")
        address = address.removeprefix("[").removesuffix("]").split("%")[0]
        found.append((address, int(port)))
    return found


def is_loopback(address: str) -> bool:
    if address == "*":
        return False
    return ipaddress.ip_address(address).is_loopback


def connect_address(bound: list[str]) -> str:
    """Where a check on the node itself connects to reach a listener bound to ``bound``."""
    if {"*", "0.0.0.0"} & set(bound):  # noqa: S104 - ss's spelling of a wildcard
        return "127.0.0.1"
    if "::" in bound:
        return "::1"
    return bound[0]


def url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def subject_alt_names(openssl_output: str) -> tuple[set[str], set[str]]:
    """DNS names and IP addresses (normalised) of ``openssl x509 -noout -ext
    subjectAltName`` output."""
    dns: set[str] = set()
    ips: set[str] = set()
    for entry in re.split(r",\s*|\n\s*", openssl_output):
        if entry.startswith("DNS:"):
            dns.add(entry.removeprefix("DNS:").strip())
        elif entry.startswith("IP Address:"):
            ips.add(str(ipaddress.ip_address(entry.removeprefix("IP Address:").strip())))
    return dns, ips


def openssl_dates(openssl_output: str) -> tuple[int, int]:
    """(notBefore, notAfter) in unix seconds from ``openssl x509 -noout -startdate
    -enddate``."""
    dates = dict(line.split("=", 1) for line in openssl_output.splitlines() if "=" in line)

    def seconds(key: str) -> int:
        when = datetime.strptime(dates[key].strip(), "%b %d %H:%M:%S %Y %Z")
        return int(when.replace(tzinfo=UTC).timestamp())

    return seconds("notBefore"), seconds("notAfter")


def expiry_margin_s(not_before: int, not_after: int) -> int:
    """Seconds a certificate must still have: a quarter of its lifetime, at most 7 days
    (the GatewayCertificateExpiresSoon alert's threshold)."""
    return min(WEEK_S, (not_after - not_before) // 4)


def prom_values(text: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+) (\S+)$", text, re.M)}


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def gateway_on(node: Host) -> None:
    if not node.config.gateway.enabled:
        pytest.skip("gateway.enabled is false for this host")


@pytest.fixture(scope="module")
def tcp_listeners(as_root) -> list[tuple[str, int]]:
    out = as_root("ss -Htln")
    assert out.rc == 0, out.stderr
    return listeners(out.stdout)


@pytest.fixture(scope="module")
def cert_dates(as_root) -> tuple[int, int]:
    out = as_root(f"openssl x509 -noout -startdate -enddate -in {front.CERT_FILE}")
    assert out.rc == 0, f"{front.CERT_FILE}: not a certificate ({out.stderr.strip()})"
    return openssl_dates(out.stdout)


# --- HAProxy -------------------------------------------------------------------------------


def test_haproxy_running_enabled_and_its_config_valid(host, as_root) -> None:
    service = host.service(front.UNIT)
    assert service.is_running and service.is_enabled
    check = as_root(f"haproxy -c -q -f {front.CONFIG_FILE}")
    assert check.rc == 0, check.stdout + check.stderr


def test_gateway_listens_on_its_ports(node: Host, tcp_listeners) -> None:
    gw = node.config.gateway
    bound = {
        port: [a for a, p in tcp_listeners if p == port] for port in (gw.port, gw.metrics_port)
    }
    assert bound[gw.port], f"nothing listens on gateway.port {gw.port}"
    assert bound[gw.metrics_port], f"nothing listens on gateway.metrics_port {gw.metrics_port}"
    if ipaddress.ip_address(gw.listen).is_unspecified:
        assert {"*", "0.0.0.0", "::"} & set(bound[gw.port]), bound[gw.port]  # noqa: S104
    else:
        assert bound[gw.port] == [str(ipaddress.ip_address(gw.listen))], bound[gw.port]


def test_fronted_services_listen_on_loopback_only(node: Host, tcp_listeners) -> None:
    fronted = front.fronted(node.config)
    assert fronted or node.config.upstream_servers  # a gateway host may front others only
    for name, svc in fronted.items():
        exposed = [a for a, p in tcp_listeners if p == svc.port and not is_loopback(a)]
        assert exposed == [], f"inference service {name} listens on {exposed} port {svc.port}"


def test_upstream_servers_answer_the_gateway(host, node: Host) -> None:
    """Each service of ``gateway.upstreams`` answers its health check from this node (its
    firewall lets the gateways in), as HAProxy's own checks ask it."""
    for server in node.config.upstream_servers:
        path = PROFILES[server.runtime].health_path
        address = f"[{server.address}]" if ":" in server.address else server.address
        url = f"http://{address}:{server.port}{path}"
        out = host.run(f"curl -fsS -o /dev/null --max-time 5 {shlex.quote(url)}")
        assert out.rc == 0, f"{server.host} {server.service}: {url} did not answer ({out.stderr})"


def test_health_answers_over_tls_with_the_certificate_on_disk(
    host, node: Host, as_root, tcp_listeners
) -> None:
    gw = node.config.gateway
    address = connect_address([a for a, p in tcp_listeners if p == gw.port])
    url = f"https://{url_host(address)}:{gw.port}/health"
    # -k: the certificate is for the node's names, not 127.0.0.1; the serial check below
    # shows it is the one on disk (HAProxy was reloaded after its renewal)
    status = host.run(f"curl -sk -o /dev/null -w '%{{http_code}}' --max-time 10 {url}")
    assert status.stdout == "200", f"{url}: {status.stdout} {status.stderr}"
    names = front.certificate_names(node.config, node.name, node.connection.address)
    served = host.run(
        f"openssl s_client -connect {url_host(address)}:{gw.port} -servername {names[0]} "
        "</dev/null 2>/dev/null | openssl x509 -noout -serial"
    )
    on_disk = as_root(f"openssl x509 -noout -serial -in {front.CERT_FILE}")
    assert served.rc == 0 and on_disk.rc == 0
    assert served.stdout.strip() == on_disk.stdout.strip()


def test_metrics_endpoint_serves_haproxy_metrics(host, node: Host, tcp_listeners) -> None:
    port = node.config.gateway.metrics_port
    address = connect_address([a for a, p in tcp_listeners if p == port])
    metrics = host.check_output(f"curl -sf --max-time 10 http://{url_host(address)}:{port}/metrics")
    assert re.search(r"^haproxy_process_build_info\{", metrics, re.M)
    # every server of every backend is up (GatewayBackendDown would fire)
    down = re.findall(
        r'^haproxy_server_status\{proxy="([^"]+)",server="([^"]+)",state="DOWN"\} 1$', metrics, re.M
    )
    assert down == []


def test_journal_holds_no_credentials(as_root) -> None:
    # the journal is readable and holds HAProxy's lines (else the count below proves nothing)
    first = as_root(f"journalctl -u {front.UNIT} --no-pager -q -o cat -n 1 | wc -l")
    assert first.rc == 0 and first.stdout.strip() == "1", first.stderr
    # counted on the node: a matching line never leaves it
    out = as_root(
        f"journalctl -u {front.UNIT} --no-pager -q -o cat | grep -ciE 'authorization|bearer'"
    )
    assert out.stdout.strip() == "0", f"{out.stdout.strip()} journal line(s) of {front.UNIT}"


# --- the certificate -----------------------------------------------------------------------


def test_certificate_file_is_the_proxys_alone(as_root) -> None:
    out = as_root(f"stat -c '%U %G %a %F' {front.CERT_FILE}")
    assert out.rc == 0, out.stderr
    assert out.stdout.split() == [front.PROXY_USER, front.PROXY_USER, "600", "regular", "file"]
    # the file holds the key for HAProxy (checked without printing it)
    key = as_root(f"openssl pkey -noout -in {front.CERT_FILE}")
    assert key.rc == 0, "no private key in the certificate file"


def test_certificate_valid_now_and_not_expiring_soon(as_root, cert_dates) -> None:
    not_before, not_after = cert_dates
    now = int(as_root("date +%s").stdout)
    assert not_before <= now, f"not valid before {not_before} (node time {now})"
    margin = expiry_margin_s(not_before, not_after)
    check = as_root(f"openssl x509 -noout -checkend {margin} -in {front.CERT_FILE}")
    assert check.rc == 0, f"expires within {margin}s (at {not_after}, node time {now})"


def test_certificate_names_this_host(node: Host, as_root) -> None:
    names = front.certificate_names(node.config, node.name, node.connection.address)
    ips = front.certificate_ips(node.config, node.connection.address)
    sans = as_root(f"openssl x509 -noout -ext subjectAltName -in {front.CERT_FILE}")
    assert sans.rc == 0, sans.stderr
    dns, addresses = subject_alt_names(sans.stdout)
    assert set(names) <= dns, set(names) - dns
    assert {str(ipaddress.ip_address(ip)) for ip in ips} <= addresses
    subject = as_root(f"openssl x509 -noout -subject -nameopt RFC2253 -in {front.CERT_FILE}")
    assert subject.stdout.strip() == f"subject=CN={names[0]}"


def test_certificate_expiry_is_exported(host, node: Host, cert_dates) -> None:
    timer = host.service(CERT_TIMER)
    assert timer.is_running and timer.is_enabled
    result = host.check_output(f"systemctl show -p Result --value {CERT_SERVICE}")
    assert result == "success"
    prom = host.file(f"{node.config.monitoring.textfile_dir}/{PROM_FILE}")
    assert prom.is_file and prom.mode == 0o644
    values = prom_values(prom.content_string)
    now = int(host.check_output("date +%s"))
    expiry = values["gpunode_gateway_certificate_expiry_timestamp_seconds"]
    assert expiry > now
    # the file on disk now, unless it was renewed since the last run
    assert expiry == cert_dates[1] or (
        values["gpunode_gateway_certificate_check_timestamp_seconds"] < cert_dates[0]
    )
    assert now - values["gpunode_gateway_certificate_check_timestamp_seconds"] < 3600
