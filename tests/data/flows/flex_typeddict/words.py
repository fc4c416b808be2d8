from typing import TypedDict


class Analysis(TypedDict):
    longest: str
    count: int
    upper: bool


def analyse(sentence: str) -> Analysis:
    """Describe a sentence."""
    words = sentence.split()
    return Analysis(longest=max(words, key=len) if words else "", count=len(words), upper=sentence.isupper())
