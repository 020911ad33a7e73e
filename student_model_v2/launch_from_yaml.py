"""Run a training script from a YAML template: ``launch_from_yaml.py --config T.yaml [options] [overrides]``.

Options: ``--print_args`` (print the script module and its argument list, exit), ``--prepare_cache``
(build the streaming JSON indexes of every ``dataset_json`` once, exit). Anything after the options is
appended to the YAML's arguments (argparse: the last value wins), e.g. ``--max_train_steps 10``; put
overrides after a ``--`` to pass a flag the launcher itself owns, e.g. ``-- --config models_yaml/x.yaml``.

YAML rules:

* A key written twice in one mapping is an error naming the key and both lines (YAML itself would keep
  the last value silently).
* Sections ``model``, ``data`` and ``train`` are merged into one flat set of flags in that order (a key
  in a later section wins); other top-level keys are added too, and one that a section sets to another
  value is an error (the original silently kept the section's); ``system`` is ignored (notes for
  humans, e.g. the GPU count to launch with).
* ``train_script`` (a dotted module or a path such as ``student_model_v2/train_lcm_anytext_v2_3.py``)
  picks the script; without it ``use_optimized: true`` picks v2_2 and anything else v2. Both keys are
  consumed here and never forwarded.
* Every key must be a flag of the chosen script (checked against its ``build_argument_parser()``
  before anything runs); a typo fails with the YAML file, the key and the closest flag.
* Values: null or "" = flag omitted (script default); a true/false flag (``store_true``) is passed
  bare when true and left out when false; a list becomes one flag followed by its values; anything
  else ``--key str(value)``. Values are checked against the flag's type and choices.
* Relative paths in the YAML (``config``, ``teacher_ckpt``, ``output_dir``, ``dataset_json``,
  ``lmdb_path``, ``cache_dir``, ``font_path``, ``font_dir``, ``log_image_dir``, ``resume_path``) resolve against the
  repository root, so a template means the same thing from any working directory. Command-line
  overrides are passed through unchanged (relative to the working directory, as for the script).

Every rank of ``accelerate launch student_model_v2/launch_from_yaml.py --config ...`` runs this file
and calls the script's ``main(argv)`` in-process, so the script sees a normal multi-process launch.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

if __package__ in (None, ""):  # run as a file: see _script_mode.py
    import _script_mode  # noqa: F401

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("model", "data", "train")
IGNORED_SECTIONS = ("system",)
DEFAULT_SCRIPT = "student_model_v2.train_lcm_anytext_v2"
OPTIMIZED_SCRIPT = "student_model_v2.train_lcm_anytext_v2_2"
PATH_KEYS = frozenset({"config", "teacher_ckpt", "output_dir", "dataset_json", "lmdb_path", "cache_dir",
                       "font_path", "font_dir", "log_image_dir", "resume_path"})
PATH_KEYWORDS = {"resume_path": {"latest"}}
ERROR_EXIT_CODE = 2

# Keys of the original toolkit's templates that this trainer does not have, with what to do instead.
LEGACY_KEYS = {
    "streaming": "annotation files are always read through the streaming index (json_index.py); remove the key",
    "no_streaming": "annotation files are always read through the streaming index (json_index.py); remove the key",
    "streaming_threshold_mb": "annotation files are always read through the streaming index; remove the key",
    "auto_list_path": "the expanded file list is printed by --prepare_cache; remove the key",
    "cfg_scale": "this script has no single guidance scale (v2_4 samples w in [w_min, w_max])",
}


class LaunchError(Exception):
    """A template or launch problem the user must fix; the message names the file and key."""


@dataclass(frozen=True)
class Entry:
    """One merged YAML key: its value and where it came from (for error messages)."""

    value: Any
    origin: str


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key written twice in one YAML mapping (plain YAML loaders keep the last value without a word)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated within one mapping, naming both lines.

    Keys brought in by a ``<<`` merge are not checked: overriding them is what a merge is for.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(None, None, f"duplicate key '{key}' on line {line} (first set on line "
                                        f"{seen[key]}): YAML would keep only the last value; set it once",
                                        key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_template(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LaunchError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except DuplicateKeyError as exc:
        raise LaunchError(f"{path.name}: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise LaunchError(f"{path.name}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LaunchError(f"{path.name}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def merge_sections(data: dict[str, Any], source: str) -> dict[str, Entry]:
    """Flatten ``model`` < ``data`` < ``train`` (later wins), then the other top-level keys.

    A top-level key that a section also sets must agree with it: one of the two values would
    otherwise be dropped without a word.
    """
    merged: dict[str, Entry] = {}
    for section in SECTIONS:
        content = data.get(section)
        if content is None:
            continue
        if not isinstance(content, dict):
            raise LaunchError(f"{source}: section '{section}' must be a mapping, got {type(content).__name__}")
        for key, value in content.items():
            merged[str(key)] = Entry(value, f"{section} section of {source}")
    for key, value in data.items():
        if key in SECTIONS or key in IGNORED_SECTIONS:
            continue
        key = str(key)
        if key in merged and merged[key].value != value:
            raise LaunchError(f"key '{key}' is {value!r} at the top level of {source} but {merged[key].value!r} in the "
                              f"{merged[key].origin}: set it once")
        merged.setdefault(key, Entry(value, f"top level of {source}"))
    return merged


def script_module_name(train_script: Entry | None, use_optimized: Entry | None) -> str:
    """Dotted module of the training script: ``train_script`` if set, else v2_2/v2 by ``use_optimized``."""
    if train_script is not None and train_script.value not in (None, ""):
        value = train_script.value
        if not isinstance(value, str):
            raise LaunchError(f"'train_script' in {train_script.origin} must be a string, got {value!r}")
        if value.endswith(".py") or "/" in value or os.sep in value:
            return _module_from_path(value, train_script.origin)
        return value
    if use_optimized is not None and use_optimized.value is not None:
        if not isinstance(use_optimized.value, bool):
            raise LaunchError(f"'use_optimized' in {use_optimized.origin} must be true or false, "
                              f"got {use_optimized.value!r}")
        return OPTIMIZED_SCRIPT if use_optimized.value else DEFAULT_SCRIPT
    return DEFAULT_SCRIPT


def _module_from_path(value: str, origin: str) -> str:
    """Dotted name of a script file; a file outside the repository is imported from its own folder."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = REPO_ROOT / path
    path = path.resolve()
    if path.suffix != ".py" or not path.is_file():
        raise LaunchError(f"train_script {value!r} in {origin}: no such Python file ({path})")
    try:
        relative = path.relative_to(REPO_ROOT)
    except ValueError:
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        return path.stem
    return ".".join(relative.with_suffix("").parts)


def import_script(module_name: str) -> ModuleType:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise LaunchError(f"training script module {module_name!r} not found") from exc
        raise
    for attr in ("build_argument_parser", "main"):
        if not callable(getattr(module, attr, None)):
            raise LaunchError(f"training script {module_name!r} has no {attr}() (needed by the launcher)")
    return module


def _flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """``key -> action`` for every ``--key`` option of the script (help/version excluded).

    argparse has no public listing of its actions; ``_actions`` has been stable since Python 3.2.
    """
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        for option in action.option_strings:
            if option.startswith("--"):
                actions[option[2:]] = action
    return actions


def _unknown_key_message(key: str, entry: Entry, known: list[str]) -> str:
    message = f"unknown key '{key}' in {entry.origin}"
    if key in LEGACY_KEYS:
        return f"{message} (a key of the original toolkit: {LEGACY_KEYS[key]})"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"{message}; did you mean '{close[0]}'?"
    return f"{message}; see the script's --help for its flags"


def _type_name(action: argparse.Action) -> str:
    return getattr(action.type, "__name__", "string") if action.type is not None else "string"


def _check_scalar(key: str, value: Any, entry: Entry, action: argparse.Action) -> str:
    """One value as the command line would carry it, validated with the flag's own type and choices."""
    if isinstance(value, (dict, list, tuple)):
        kind = "mapping" if isinstance(value, dict) else "list"
        raise LaunchError(f"key '{key}' in {entry.origin} expects a single value of type {_type_name(action)}, "
                          f"got a {kind}: {value!r}")
    if isinstance(value, bool):
        raise LaunchError(f"key '{key}' in {entry.origin} expects a value of type {_type_name(action)}, "
                          f"got {value!r} (true/false is only for on/off flags)")
    text = str(value)
    converted: Any = text
    if action.type is not None:
        try:
            converted = action.type(text)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise LaunchError(f"key '{key}' in {entry.origin} expects a value of type {_type_name(action)}, "
                              f"got {value!r}") from exc
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(str(c) for c in action.choices)
        raise LaunchError(f"key '{key}' in {entry.origin} must be one of {choices}; got {value!r}")
    return text


def _resolve_path(key: str, text: str) -> str:
    if key not in PATH_KEYS or text in PATH_KEYWORDS.get(key, ()):
        return text
    parts = [p.strip() for p in text.split(",")] if key == "dataset_json" else [text]
    resolved = []
    for part in parts:
        path = Path(part).expanduser()
        resolved.append(str(path if path.is_absolute() or not part else REPO_ROOT / path))
    return ",".join(resolved)


def entry_to_args(key: str, entry: Entry, action: argparse.Action) -> list[str]:
    """Command-line words of one key (empty when the key leaves the script's default)."""
    value = entry.value
    if value is None or value == "":
        return []
    flag = f"--{key}"
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise LaunchError(f"key '{key}' in {entry.origin} is an on/off flag: use true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag] if value else [f"--no-{key}"]
        return [flag] if value else []
    many = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
    if isinstance(value, (list, tuple)):
        if not many:
            raise LaunchError(f"key '{key}' in {entry.origin} expects a single value of type {_type_name(action)}, "
                              f"got a list: {value!r}")
        if not value and action.nargs == "+":
            raise LaunchError(f"key '{key}' in {entry.origin} needs at least one value, got an empty list")
        values = list(value)
    else:
        values = [value]
    if isinstance(action.nargs, int) and action.nargs > 1 and len(values) != action.nargs:
        raise LaunchError(f"key '{key}' in {entry.origin} needs exactly {action.nargs} values, got {len(values)}")
    words = [_resolve_path(key, _check_scalar(key, v, entry, action)) for v in values]
    return [flag, *words]


def build_args(merged: dict[str, Entry], parser: argparse.ArgumentParser) -> list[str]:
    """The script's argument list for the merged YAML keys, after checking every key against ``parser``."""
    actions = _flag_actions(parser)
    known = sorted(actions)
    argv: list[str] = []
    for key, entry in merged.items():
        if key not in actions:
            raise LaunchError(_unknown_key_message(key, entry, known))
        argv.extend(entry_to_args(key, entry, actions[key]))
    return argv


@dataclass
class LaunchPlan:
    module_name: str
    module: ModuleType
    argv: list[str]


def plan_launch(config: Path, overrides: list[str]) -> LaunchPlan:
    """Template → (script module, full argument list); raises :class:`LaunchError` on any template problem."""
    merged = merge_sections(load_template(config), config.name)
    module_name = script_module_name(merged.pop("train_script", None), merged.pop("use_optimized", None))
    module = import_script(module_name)
    argv = build_args(merged, module.build_argument_parser()) + list(overrides)
    return LaunchPlan(module_name, module, argv)


def prepare_cache(args: argparse.Namespace) -> list[tuple[Path, int, int]]:
    """Build (or validate) the streaming index of every dataset file: [(file, kept items, total items)]."""
    from student_model_v2.data.json_index import JsonIndex, expand_dataset_paths

    results = []
    for path in expand_dataset_paths(args.dataset_json):
        index = JsonIndex(path, cache_dir=args.cache_dir or None, wm_thresh=args.wm_thresh)
        results.append((path, len(index), index.total))
    return results


def _run_prepare_cache(plan: LaunchPlan) -> None:
    script_args = plan.module.build_argument_parser().parse_args(plan.argv)
    if script_args.use_mock_dataset:
        print("prepare_cache: use_mock_dataset is set, no dataset files to index")
        return
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        print(f"prepare_cache: rank {rank} skips (rank 0 builds the indexes)")
        return
    from student_model_v2.data.json_index import DatasetFileError, default_cache_dir

    print(f"prepare_cache: index folder {script_args.cache_dir or default_cache_dir()}")
    try:
        results = prepare_cache(script_args)
    except (FileNotFoundError, DatasetFileError) as exc:
        raise LaunchError(f"prepare_cache: {exc}") from exc
    for path, kept, total in results:
        print(f"  {path}: {kept} of {total} items kept (wm_thresh={script_args.wm_thresh})")


def build_launcher_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n", 1)[0], allow_abbrev=False,
        epilog="Further arguments are appended to the template's, e.g. --max_train_steps 10.",
    )
    parser.add_argument("--config", required=True, type=Path, help="YAML template (model/data/train sections)")
    parser.add_argument("--print_args", action="store_true", help="print the script module and its arguments, then exit")
    parser.add_argument("--prepare_cache", action="store_true",
                        help="build the JSON indexes of every dataset_json on this one process, then exit")
    return parser


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    own, after_dashes = _split_overrides(list(sys.argv[1:] if argv is None else argv))
    options, extra = build_launcher_parser().parse_known_args(own)
    overrides = extra + after_dashes
    try:
        plan = plan_launch(options.config, overrides)
        if options.print_args:
            plan.module.build_argument_parser().parse_args(plan.argv)
            print(f"script: {plan.module_name}")
            print(f"args: {shlex.join(plan.argv)}")
            return 0
        if options.prepare_cache:
            _run_prepare_cache(plan)
            return 0
    except LaunchError as exc:
        print(f"launch_from_yaml: error: {exc}", file=sys.stderr)
        raise SystemExit(ERROR_EXIT_CODE) from None
    plan.module.main(plan.argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
