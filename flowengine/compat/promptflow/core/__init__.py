"""`promptflow.core` names: tool, log_metric, Prompty, model configurations, ToolProvider."""

from flowengine.hooks import ToolProvider, log_metric, tool, trace

__all__ = ["tool", "log_metric", "trace", "ToolProvider", "Prompty", "AsyncPrompty", "OpenAIModelConfiguration",
           "AzureOpenAIModelConfiguration"]

_LAZY = ("Prompty", "AsyncPrompty", "OpenAIModelConfiguration", "AzureOpenAIModelConfiguration")


def __getattr__(name):
    # Prompty pulls in the openai SDK; load it only for code that uses it.
    if name in _LAZY:
        import flowengine.prompty

        return getattr(flowengine.prompty, name)
    raise AttributeError(f"module 'promptflow.core' has no attribute {name!r}")
