def decorate(text: str, mark: str) -> str:
    return f"{mark}{text}{mark}"
