"""Provision a controller: gpunode in a venv and a timer that runs
``gpunode drift INVENTORY DEPLOY --apply`` against the fleet (settings: ``monitoring.drift``).

    pyinfra -y inventories/controller.py deploys/controller.py
"""

from gpunode import pipeline
from gpunode.operations.server import stage_uploads_as_login
from roles.base import base
from roles.controller import controller

pipeline.install()  # fact reads pipelined: gpunode/pipeline.py
stage_uploads_as_login()  # with sudo: in the login's own temporary directory

base()  # the OS layer (package proxy, admin users, journald, updates) as on every node
controller()
