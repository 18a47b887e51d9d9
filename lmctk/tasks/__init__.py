"""Tasks by name: built-ins `digits`, `synthetic`, `text`, `text-mlm`, and user tasks `module:function`.

A user task is code lmctk imports and calls, so only the user may name one (command line or API call):
a task name read from a file (run manifest, recipe) passes `refuse_code` first, which admits built-ins.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from lmctk.errors import ConfigError
from lmctk.tasks.base import (
    KINDS,
    TASK_ATTRIBUTES,
    Batch,
    DataOrder,
    Task,
    TaskBase,
    evaluate,
    forward,
)
from lmctk.tasks.classification import TensorClassification
from lmctk.tasks.digits import digits
from lmctk.tasks.mlm import text_mlm
from lmctk.tasks.synthetic import synthetic
from lmctk.tasks.text import text

_BUILTINS: dict[str, Callable[..., Task]] = {
    "digits": digits,
    "synthetic": synthetic,
    "text": text,
    "text-mlm": text_mlm,
}
TASKS = tuple(_BUILTINS)

__all__ = [
    "TASKS",
    "Batch",
    "DataOrder",
    "Task",
    "TaskBase",
    "TensorClassification",
    "evaluate",
    "forward",
    "get_task",
    "names_code",
    "refuse_code",
]


def _check_options(label: str, function: Callable[..., Any], options: dict[str, Any]) -> None:
    """Raise ConfigError naming the first option `function` does not accept (unless it takes **kwargs)."""
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in options:
        if key not in accepted:
            choices = ", ".join(accepted) if accepted else "none"
            raise ConfigError(f"{label}: unknown option {key!r}; accepted options: {choices}")


def _user_task(spec: str) -> Callable[..., Any]:
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"task {spec!r}: cannot import module {module_name!r} ({err}); check it is on sys.path"
        ) from err
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(
            f"task {spec!r}: module {module_name!r} has no function {function_name!r}; check the name"
        )
    return function


def names_code(name: str) -> bool:
    """Whether the task `name` is a user `module:function` (code to import) rather than a built-in."""
    return name not in _BUILTINS and ":" in name


def refuse_code(name: str, where: str, opt_in: str, allow_code: bool | str = False) -> None:
    """Data never chooses code to run: refuse a `module:function` task read from a file (`where`).

    `allow_code` is True, or the one `module:function` the user named; `opt_in` says how to name it.
    """
    if names_code(name) and allow_code is not True and allow_code != name:
        raise ConfigError(f"{where}: task {name!r} is Python code named by a file, which lmctk does not run; "
                          f"if you trust it, {opt_in}")


def get_task(name: str, **options: Any) -> Task:
    """The task `name` built with `options`: a built-in, or `module:function` returning a Task."""
    if name in _BUILTINS:
        factory = _BUILTINS[name]
    elif ":" in name:
        factory = _user_task(name)
    else:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASKS)} or give module:function")
    _check_options(f"task {name!r}", factory, options)
    task = factory(**options)
    missing = [attribute for attribute in TASK_ATTRIBUTES if not hasattr(task, attribute)]
    if missing:
        raise ConfigError(
            f"task {name!r}: the returned object lacks {', '.join(missing)}; "
            "return a Task (see lmctk.tasks.base)"
        )
    if task.kind not in KINDS:
        raise ConfigError(f"task {name!r}: unknown kind {task.kind!r}; set kind to one of {', '.join(KINDS)}")
    return task
