from promptflow.core import tool


@tool
def greet_casual(name: str, emoji: bool) -> str:
    return f"hi {name}" + (" :)" if emoji else "")
