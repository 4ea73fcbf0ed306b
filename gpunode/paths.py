"""Where gpunode's repository parts live (gpunode is installed editable from its repo)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = REPO_ROOT / "templates"
HOST_TESTS = REPO_ROOT / "tests" / "host"


def template(*parts: str) -> str:
    """The path of a template under ``templates/`` (``template("base", "sudoers.j2")`` or
    ``template("base/sudoers.j2")``), as pyinfra's ``files.template`` takes it."""
    return str(TEMPLATES.joinpath(*parts))
