"""Loading the addon modules of ``addons/`` by file, the way ``mitmdump -s`` loads a script.

``addons/`` is not an installed package (``pip install .`` installs ``auditgate`` alone), so
``addons/gateway.py`` cannot import its siblings by a package name. Each sibling is loaded here
under a name of its own (``auditgate_addons.<module>``), which collides with nothing a user has
installed, and is loaded afresh whenever the bundle is (re)loaded.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

MODULE_PREFIX = "auditgate_addons."


def load_addon_module(directory: Path, name: str) -> ModuleType:
    """Execute <directory>/<name>.py as module auditgate_addons.<name> and return it."""
    path = Path(directory) / f"{name}.py"
    fullname = MODULE_PREFIX + name
    spec = importlib.util.spec_from_file_location(fullname, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no addon module {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[fullname] = module  # dataclasses and pickling look a module up by its name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(fullname, None)
        raise
    return module


def bundle(script: str, names: list[str]) -> list:
    """The addons of each named module beside `script` (each module's own ``addons`` list), in order,
    each flow hook under the bundle's guard (``auditgate.core.guard``: an exception refuses the flow);
    first, the addon that installs the dispatch index (``auditgate.core.hook_dispatch``); last, the one
    that freezes the start-up heap once the gateway runs (``auditgate.core.heap_freeze``)."""
    from auditgate.core.guard import guard_addon
    from auditgate.core.heap_freeze import HeapFreeze
    from auditgate.core.hook_dispatch import DispatchIndex

    directory = Path(script).resolve().parent
    return [DispatchIndex(), *(guard_addon(addon) for name in names for addon in load_addon_module(directory, name).addons),
            HeapFreeze()]
