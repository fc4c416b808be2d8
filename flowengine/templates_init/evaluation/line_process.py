from promptflow.core import tool


@tool
def line_process(groundtruth: str, prediction: str) -> str:
    """Grade one line: Correct when the prediction matches the ground truth, ignoring case."""
    return "Correct" if groundtruth.strip().lower() == prediction.strip().lower() else "Incorrect"
