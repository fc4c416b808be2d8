"""The `prompt` node: render a Jinja2 template (in the sandbox) to text, without calling a model."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from flowengine.templates import preprocess_template_string, render_prompt


def read_template(flow_dir: Path, rel_path: str) -> str:
    """The text of a node's template file, relative to the flow folder."""
    return (flow_dir / rel_path).read_text(encoding="utf-8-sig")


def run_prompt_node(
    *,
    template: str,
    template_path: str,
    inputs: Mapping[str, Any],
    inputs_to_escape: Collection[str] = (),
) -> str:
    """Render the template with the node's inputs, escaping role-like text from flow inputs as prompt flow does."""
    return render_prompt(
        preprocess_template_string(template),
        inputs,
        inputs_to_escape=inputs_to_escape,
        template_path=template_path,
    )
