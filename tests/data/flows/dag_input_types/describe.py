from promptflow.core import tool


@tool
def describe(s: str, i: int, d: float, b: bool, l: list, o: dict) -> dict:
    values = {"s": s, "i": i, "d": d, "b": b, "l": l, "o": o}
    return {
        "types": {name: type(value).__name__ for name, value in values.items()},
        "values": values,
        "i_plus_one": i + 1,
    }
