from dataclasses import dataclass


@dataclass
class Measurement:
    area: float
    perimeter: float
    kind: str


def measure(width: float, height: float) -> Measurement:
    """Measure a rectangle."""
    kind = "square" if width == height else "rectangle"
    return Measurement(area=width * height, perimeter=2 * (width + height), kind=kind)
