"""Makes ``python student_model_v2/<script>.py`` behave like ``python -m student_model_v2.<script>``.

Run as a file, a script's folder is ``sys.path[0]`` and the package above it is not importable. Every
script therefore starts with::

    if __package__ in (None, ""):
        import _script_mode  # noqa: F401

which imports this module from the script's own folder. It puts the repository root first on the
path so the script's absolute ``student_model_v2.…`` imports resolve, and moves the script folder to
the end, where its package folders (``data``, ``training``…) cannot shadow a library of the same name.
The folder stays on the path because spawned worker processes (DataLoader ``spawn``, accelerate)
re-run the script with the parent's path and import this module again.
"""

import sys
from pathlib import Path

_SCRIPT_DIR = Path(__file__).resolve().parent
_REPO_ROOT = str(_SCRIPT_DIR.parent)


def _is_script_dir(entry: str) -> bool:
    return Path(entry or ".").resolve() == _SCRIPT_DIR


sys.path[:] = [_REPO_ROOT] + [p for p in sys.path if p != _REPO_ROOT and not _is_script_dir(p)] + [str(_SCRIPT_DIR)]
