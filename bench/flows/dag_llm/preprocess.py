from promptflow.core import tool


@tool
def preprocess(question: str) -> str:
    """Normalise whitespace; the fake LLM hashes the rendered prompt."""
    return " ".join(question.split())
