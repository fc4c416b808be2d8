from promptflow.core import tool


@tool
def clean(question: str) -> str:
    """Collapse whitespace and lower-case the question."""
    return " ".join(question.split()).lower()
