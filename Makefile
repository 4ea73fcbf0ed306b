# gpunode: `sudo make lab` runs the main job, `sudo make test` runs the tests.
# Both do all the set-up a fresh Debian 12 machine needs (apt packages, venv, lab base image).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
APT_PACKAGES := systemd-container debootstrap tinyproxy vagrant iproute2 openssh-client make gpg nftables cmake g++ haproxy qemu-system-x86 rsyslog rsyslog-gnutls fdisk dosfstools mtools

.PHONY: deps vm-deps venv lab lab-down vm-lab vm-lab-down check test unit test-vm reference mutate

deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

# What the VM lab needs beyond `deps` (not part of `make test`)
VM_PACKAGES := libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients vagrant-libvirt dnsmasq-base iptables qemu-utils e2fsprogs ovmf fdisk dosfstools mtools

vm-deps: deps
	@missing=""; for p in $(VM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(BIN)/gpunode: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/gpunode

# The main job: 2 lab hosts, provisioned with deploys/gpu_node.py, then verified; lab-01
# serves a real model (llama.cpp on the CPU) behind the gateway, asked over TLS at the end.
lab: deps venv
	$(BIN)/gpunode lab up --hosts 2 --front-door
	$(BIN)/pyinfra -y inventories/lab.py deploys/gpu_node.py
	$(BIN)/gpunode verify inventories/lab.py
	$(BIN)/gpunode lab ask "Say hello in five words."

lab-down: venv
	$(BIN)/gpunode lab down

# The Vagrant lab on real VMs (docs/lab.md): a box built here, `vagrant up` under libvirt
# (KVM, or software emulation where there is none), the deploy with sudo, then verify.
vm-lab: vm-deps venv
	$(BIN)/gpunode vm-lab up
	$(BIN)/pyinfra -y --sudo inventories/vagrant.py deploys/gpu_node.py
	$(BIN)/gpunode verify inventories/vagrant.py

vm-lab-down: venv
	$(BIN)/gpunode vm-lab down

check: venv
	$(BIN)/ruff check gpunode roles deploys inventories tests scripts bench
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest tests/unit

# The VM tests (root; docs/testing.md): kernel, boot and firewall paths on the VM lab's real
# VMs, which containers cannot reach. Not part of `make test` (tens of minutes under TCG).
test-vm: vm-deps venv
	$(BIN)/pytest tests/vm

# docs/reference.md from gpunode/schema/ (tests/unit/test_reference.py fails when it is stale)
reference: venv
	$(BIN)/python scripts/gen_reference.py --write

# Mutation testing of the security-critical modules (docs/mutation.md); not part of `make test`.
mutate: venv
	$(BIN)/python scripts/mutate.py

# Everything: lint, types, unit tests, lab tests (root; CI=true makes lab tests fail rather than skip).
test: deps venv check
	$(BIN)/pytest tests/unit tests/lab
