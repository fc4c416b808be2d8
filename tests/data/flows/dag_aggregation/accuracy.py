from typing import List

from promptflow.core import log_metric, tool


@tool
def accuracy(grades: List[str], scores: List[float], truths: List[str]) -> dict:
    correct = grades.count("Correct")
    result = {
        "accuracy": round(correct / len(grades), 4),
        "lines": len(grades),
        "mean_score": round(sum(scores) / len(scores), 4),
        "distinct_truths": len(set(truths)),
    }
    for key, value in result.items():
        log_metric(key, value)
    return result
