"""Where gpunode's repository parts live (gpunode is installed editable from its repo)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = REPO_ROOT / "templates"
HOST_TESTS = REPO_ROOT / "tests" / "host"
