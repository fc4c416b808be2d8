from promptflow.core import tool


@tool
def summary(shout: str, words: int, meta: dict, flag: bool, ratio: float, tags: list, options: dict) -> dict:
    return {
        "length": len(shout),
        "words": words,
        "chars": meta["counts"]["chars"],
        "flag": flag,
        "ratio": ratio,
        "tags": tags,
        "options": options,
    }
