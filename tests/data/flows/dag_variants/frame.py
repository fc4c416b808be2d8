from promptflow.core import tool


@tool
def frame(text: str) -> str:
    return f"[{text}]"
