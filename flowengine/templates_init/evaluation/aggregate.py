from promptflow.core import log_metric, tool


@tool
def aggregate(processed_results: list[str]) -> float:
    """Runs once after all lines: the share of Correct lines, logged as the `accuracy` metric."""
    accuracy = (
        round(processed_results.count("Correct") / len(processed_results), 2) if processed_results else 0.0
    )
    log_metric(key="accuracy", value=accuracy)
    return accuracy
