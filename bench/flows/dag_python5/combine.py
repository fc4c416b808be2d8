from promptflow.core import tool


@tool
def combine(words: int, numbers: list) -> dict:
    """Summarise the counts into one dict."""
    return {"words": words, "numbers": numbers, "total": sum(numbers)}
