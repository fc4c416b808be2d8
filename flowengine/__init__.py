"""The flow engine: load, validate and run prompt-flow style flows. Pure Python; never imports Django."""

from __future__ import annotations

from flowengine import events
from flowengine.executor import AggregationResult, FlowExecutor, LineResult
from flowengine.loader import load_flow
from flowengine.model import Flow, FlowValidationError, Problem
from flowengine.validation import validate

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
