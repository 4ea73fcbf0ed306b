"""Provision a controller: gpunode in a venv and a timer that runs
``gpunode drift INVENTORY DEPLOY --apply`` against the fleet (settings: ``monitoring.drift``).

    pyinfra -y inventories/controller.py deploys/controller.py
"""

from roles.controller import controller

controller()
