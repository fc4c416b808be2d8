"""`promptflow.contracts.types`: Secret, PromptTemplate, FilePath."""

from flowengine.compat._connections import Secret


class PromptTemplate(str):
    """A prompt template string parameter."""


class FilePath(str):
    """A file path parameter."""


__all__ = ["Secret", "PromptTemplate", "FilePath"]
