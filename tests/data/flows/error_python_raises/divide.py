from promptflow.core import tool


def _checked(divisor: int) -> int:
    if divisor < 0:
        raise ValueError(f"divisor must not be negative, got {divisor}")
    return divisor


@tool
def divide(divisor: int) -> float:
    return 10 / _checked(divisor)
