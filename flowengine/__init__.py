"""The flow engine: load, validate and run prompt-flow style flows. Pure Python; never imports Django.

The exports are imported on first use, so that `import flowengine.cli` (every `flowstudio` command) and the
runner start without loading the executor, Jinja2 and the LLM SDK before they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowengine import events
    from flowengine.executor import AggregationResult, FlowExecutor, LineResult
    from flowengine.loader import load_flow
    from flowengine.model import Flow, FlowValidationError, Problem
    from flowengine.validation import validate

_EXPORTS = {
    "AggregationResult": "flowengine.executor",
    "Flow": "flowengine.model",
    "FlowExecutor": "flowengine.executor",
    "FlowValidationError": "flowengine.model",
    "LineResult": "flowengine.executor",
    "Problem": "flowengine.model",
    "events": "flowengine.events",
    "load_flow": "flowengine.loader",
    "validate": "flowengine.validation",
}

__all__ = [
    "AggregationResult",
    "Flow",
    "FlowExecutor",
    "FlowValidationError",
    "LineResult",
    "Problem",
    "events",
    "load_flow",
    "validate",
]


def __getattr__(name: str) -> Any:
    """Import an export on first access."""
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'flowengine' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if name == "events" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
