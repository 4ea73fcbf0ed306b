"""The floor of a converged run (bench/converge.py): pyinfra starts, loads the inventory,
connects to each host and runs one ``true`` there, the least a run that proves anything
about a host can cost. gpunode's own cost in a converged run is what it adds to this."""

from pyinfra import host
from pyinfra.facts.server import Command

host.get_fact(Command, "true")
