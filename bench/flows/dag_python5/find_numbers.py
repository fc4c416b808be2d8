import re

from promptflow.core import tool


@tool
def find_numbers(text: str) -> list:
    """Every integer written in the text."""
    return [int(n) for n in re.findall(r"\d+", text)]
