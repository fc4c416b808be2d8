from promptflow.core import tool


@tool
def do_math(query: str) -> str:
    return str(sum(int(ch) for ch in query if ch.isdigit()))
