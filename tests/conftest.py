"""Test session set-up shared by tests/unit and tests/lab.

pyinfra runs on gevent: its CLI monkey-patches the standard library before anything
else is imported (pyinfra_cli/__init__.py), and API scripts must do the same. Tests
import pyinfra's API and CLI modules in-process, and talk TLS (hvac to a real OpenBao):
patching only when pyinfra_cli is first imported, after ssl, breaks ssl later
(RecursionError in SSLContext). So patch once, here, before any test module loads.
"""

from gevent import monkey

monkey.patch_all()
