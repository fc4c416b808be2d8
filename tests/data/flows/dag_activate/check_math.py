from promptflow.core import tool


@tool
def check_math(result: str) -> str:
    return f"checked {result}"
