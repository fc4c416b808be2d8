"""Flow Studio's stand-in for the `promptflow` package (used only when prompt flow is not installed)."""

from flowengine.hooks import ToolProvider, log_metric, tool, trace

__version__ = "1.18.5"
__all__ = ["tool", "log_metric", "trace", "ToolProvider", "Prompty", "AsyncPrompty"]


def __getattr__(name):
    # Prompty pulls in the openai SDK; load it only for code that uses it.
    if name in ("Prompty", "AsyncPrompty"):
        import flowengine.prompty

        return getattr(flowengine.prompty, name)
    raise AttributeError(f"module 'promptflow' has no attribute {name!r}")
