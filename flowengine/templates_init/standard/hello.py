from promptflow.core import tool


# The node's inputs are the function's parameters; type hints let the studio show the types.
@tool
def my_python_tool(input1: str) -> str:
    return "Prompt: " + input1
