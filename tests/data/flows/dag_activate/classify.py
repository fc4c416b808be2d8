from promptflow.core import tool


@tool
def classify(query: str) -> str:
    return "math" if any(ch.isdigit() for ch in query) else "text"
