from promptflow.core import tool


@tool
def upper(text: str, times: int, sep: str) -> str:
    return sep.join([text.upper()] * times)
