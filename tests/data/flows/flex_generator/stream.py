def count_up(word: str, n: int = 3):
    """Yield the word with a counter, one chunk at a time."""
    for i in range(1, n + 1):
        yield f"{word}{i} "
