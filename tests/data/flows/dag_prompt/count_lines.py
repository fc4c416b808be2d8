from promptflow.core import tool


@tool
def count_lines(text: str) -> int:
    return len(text.splitlines())
