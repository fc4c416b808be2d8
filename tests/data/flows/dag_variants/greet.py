from promptflow.core import tool


@tool
def greet(name: str, style: str) -> str:
    if style == "shouting":
        return f"HEY {name.upper()}!"
    return f"Good day, {name}."
