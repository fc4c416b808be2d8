from promptflow.core import tool


@tool
def explain(kind: str) -> str:
    return f"classified as {kind}"
