"""`promptflow.client` names: load_flow for running a flow folder or file from user code."""

from flowengine.compat._client import load_flow

__all__ = ["load_flow"]
