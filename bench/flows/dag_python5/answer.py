from promptflow.core import tool


@tool
def answer(question: str, summary: dict) -> str:
    """Format the final answer line."""
    return f"{question} -> {summary['words']} words, numbers {summary['numbers']} (sum {summary['total']})"
