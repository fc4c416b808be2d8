from promptflow.core import tool


@tool
def stats(text: str) -> dict:
    words = text.split()
    return {"first": words[0] if words else "", "counts": {"words": len(words), "chars": len(text)}}
