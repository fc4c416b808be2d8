from promptflow.core import tool


@tool
def echo(value: str) -> str:
    return value
