from promptflow.connections import CustomConnection
from promptflow.core import tool
from promptflow.tracing import trace


@trace
def shout(text: str) -> str:
    return text.upper()


@tool
def greet(conn: CustomConnection, name: str) -> dict:
    return {
        "message": f"{conn.configs['greeting']}, {name}!",
        "token_length": len(conn.secrets["token"]),
        "connection_type": type(conn).__name__,
        "traced": shout(name),
        "by_attribute": conn.greeting,
    }
