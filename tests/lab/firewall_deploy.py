"""The firewall role alone, for tests/lab/test_firewall.py (nftables is installed on the
lab hosts by the test, so the base role's package proxy is not needed)."""

from roles.firewall import firewall

firewall()
