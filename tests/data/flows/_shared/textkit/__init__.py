from .counting import vowel_count

__all__ = ["vowel_count"]
