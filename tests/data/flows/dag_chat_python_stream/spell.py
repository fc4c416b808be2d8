from promptflow.core import tool


@tool
def spell(question: str, history_length: int):
    for word in question.split():
        yield word.upper() + " "
    yield f"({history_length})"
