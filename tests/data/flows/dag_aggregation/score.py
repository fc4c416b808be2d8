from promptflow.core import tool


@tool
def score(grade: str) -> dict:
    return {"value": 1.0 if grade == "Correct" else 0.0}
