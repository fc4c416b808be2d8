from promptflow.core import tool


@tool
def merge(math: str = None, text: str = None) -> str:
    return f"math={math!r} text={text!r}"
