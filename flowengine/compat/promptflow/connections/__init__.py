"""`promptflow.connections` names: the connection classes with prompt flow's attributes."""

from flowengine.compat._connections import (
    AzureOpenAIConnection,
    CustomConnection,
    CustomStrongTypeConnection,
    OpenAIConnection,
    ServerlessConnection,
)

__all__ = ["OpenAIConnection", "AzureOpenAIConnection", "CustomConnection", "CustomStrongTypeConnection",
           "ServerlessConnection"]
