"""`promptflow.client.load_flow`: call a flow folder or file like a function from user code."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class _CallableFlow:
    """A loaded flow; calling it with keyword inputs runs one line and returns its outputs."""

    def __init__(self, source: str | Path, **kwargs: Any) -> None:
        from flowengine.loader import load_flow as _load

        self._flow = _load(source)
        self._init = kwargs.get("init")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise TypeError("a flow can only be called with keyword arguments")
        from flowengine.connections import current_connections
        from flowengine.executor import FlowExecutor
        from flowengine.llm import run_sync

        async def run() -> Any:
            executor = FlowExecutor(self._flow, connections=current_connections(), init=self._init)
            try:
                return await executor.run_line_result(kwargs)
            finally:
                executor.close()

        result = run_sync(run())
        if getattr(result, "status", "Completed") != "Completed":
            error = getattr(result, "error", None)
            raise RuntimeError(getattr(error, "message", None) or "the flow failed")
        return result.outputs


def load_flow(source: str | Path, **kwargs: Any) -> Any:
    """A callable for a flow folder, flow YAML or .prompty (a Prompty for .prompty files)."""
    if str(source).endswith(".prompty"):
        from flowengine.prompty import Prompty

        return Prompty.load(source, **kwargs)
    return _CallableFlow(source, **kwargs)
