from pathlib import Path

from promptflow.core import Prompty
from promptflow.tracing import trace

HERE = Path(__file__).parent


@trace
def tell(subject: str, temperature: float = 0.0):
    """Load a prompty with overridden configuration and call it."""
    prompty = Prompty.load(
        source=HERE / "joke.prompty",
        model={
            "configuration": {"type": "openai", "connection": "fake_openai", "model": "gpt-4o-mini"},
            "parameters": {"temperature": temperature, "max_tokens": 32},
        },
    )
    joke = prompty(subject=subject)
    return {"joke": joke, "subject": subject}
