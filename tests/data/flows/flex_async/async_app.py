import asyncio


async def _length(word: str) -> int:
    await asyncio.sleep(0)
    return len(word)


async def gather_lengths(words: list):
    """Measure words concurrently."""
    lengths = await asyncio.gather(*(_length(w) for w in words))
    return {"total": sum(lengths), "lengths": dict(zip(words, lengths))}
