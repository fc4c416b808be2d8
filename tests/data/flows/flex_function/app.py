def shorten(text: str, max_words: int = 3) -> str:
    """Keep the first words of a text."""
    words = text.split()
    suffix = " ..." if len(words) > max_words else ""
    return " ".join(words[:max_words]) + suffix
