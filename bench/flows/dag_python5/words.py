from promptflow.core import tool


@tool
def words(text: str) -> int:
    """Count the words of the text."""
    return len(text.split())
