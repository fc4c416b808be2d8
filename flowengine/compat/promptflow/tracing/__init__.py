"""`promptflow.tracing` names: trace and start_trace."""

from flowengine.hooks import start_trace, trace

__all__ = ["trace", "start_trace"]
