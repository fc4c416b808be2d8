from promptflow.core import tool


@tool
def grade(answer: str, truth: str) -> str:
    return "Correct" if answer.strip().lower() == truth.strip().lower() else "Incorrect"
