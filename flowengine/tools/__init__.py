"""Built-in node tools: llm, prompt and python."""
