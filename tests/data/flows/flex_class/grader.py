class Grader:
    """Scores an answer against the truth by word overlap."""

    def __init__(self, label: str, threshold: float = 0.5):
        self.label = label
        self.threshold = threshold

    def __call__(self, answer: str, truth: str):
        a, t = set(answer.lower().split()), set(truth.lower().split())
        score = round(len(a & t) / len(t), 4) if t else 0.0
        return {"score": score, "passed": score >= self.threshold, "label": self.label}

    def __aggregate__(self, line_results: list) -> dict:
        scores = [r["score"] for r in line_results]
        return {
            "mean_score": round(sum(scores) / len(scores), 4),
            "pass_rate": round(sum(1 for r in line_results if r["passed"]) / len(line_results), 4),
            "lines": len(line_results),
        }
