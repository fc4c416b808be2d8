import os

from helpers import decorate
from textkit import vowel_count

from promptflow.core import tool


@tool
def use_env(text: str) -> dict:
    return {
        "decorated": decorate(text, os.environ.get("CORPUS_MARK", "*")),
        "vowels": vowel_count(text),
        "greeting": os.environ["CORPUS_GREETING"],
        "mode": os.environ.get("CORPUS_MODE", "unset"),
        "key_from_connection": os.environ.get("CORPUS_KEY", "unset"),
    }
