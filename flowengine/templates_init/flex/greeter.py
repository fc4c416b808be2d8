from promptflow.tracing import trace


class Greeter:
    """A flex flow: `__init__` takes the init values, each call is one line, `__aggregate__` runs after a batch."""

    def __init__(self, greeting: str = "Hello"):
        self.greeting = greeting

    @trace
    def shout(self, text: str) -> str:
        return text.upper()

    def __call__(self, name: str) -> dict:
        message = f"{self.greeting}, {name}!"
        return {"message": message, "loud": self.shout(message)}

    def __aggregate__(self, line_results: list) -> dict:
        lengths = [len(r["message"]) for r in line_results]
        return {"average_length": sum(lengths) / len(lengths) if lengths else 0}
