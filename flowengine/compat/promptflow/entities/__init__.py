"""`promptflow.entities` names: the connection classes."""

from flowengine.compat._connections import (
    AzureOpenAIConnection,
    CustomConnection,
    CustomStrongTypeConnection,
    OpenAIConnection,
    ServerlessConnection,
)

__all__ = ["OpenAIConnection", "AzureOpenAIConnection", "CustomConnection", "CustomStrongTypeConnection",
           "ServerlessConnection"]
