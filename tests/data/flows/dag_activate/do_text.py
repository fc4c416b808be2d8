from promptflow.core import tool


@tool
def do_text(query: str) -> str:
    return query[::-1]
