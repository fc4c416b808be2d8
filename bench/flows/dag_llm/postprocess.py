from promptflow.core import tool


@tool
def postprocess(text: str) -> str:
    """Trim the model's answer."""
    return text.strip()
