"""Code written for prompt flow runs without prompt flow: the shim package and the hooks the executor observes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

from flowengine import hooks
from flowengine.compat._connections import from_promptflow_connection, to_promptflow_connection
from flowengine.connections import Connection

REPO = Path(__file__).resolve().parents[2]


def run_fresh(code: str) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter with the shim installed the way the runner installs it."""
    prelude = "import flowengine.compat as c\nassert c.install(), 'prompt flow is installed here'\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_usual_promptflow_imports_and_connection_classes_work_in_a_fresh_interpreter():
    done = run_fresh(
        """
        import importlib.util
        from promptflow import tool, log_metric
        from promptflow.core import tool as core_tool, log_metric as core_log, Prompty, AsyncPrompty, ToolProvider
        from promptflow.core import OpenAIModelConfiguration, AzureOpenAIModelConfiguration
        from promptflow.tracing import trace, start_trace
        from promptflow.connections import OpenAIConnection, AzureOpenAIConnection, CustomConnection
        from promptflow.entities import CustomConnection as EntityCustom
        from promptflow.client import load_flow
        from promptflow.contracts.types import Secret
        import flowengine.hooks as h
        assert tool is core_tool is h.tool and log_metric is core_log is h.log_metric and trace is h.trace
        assert EntityCustom is CustomConnection
        start_trace()

        @tool
        def shout(text: str) -> str:
            return text.upper()

        assert h.is_tool(shout) and shout("a") == "A"
        config = OpenAIModelConfiguration(model="gpt", connection="c")
        from promptflow.connections import AzureOpenAIConnection, CustomConnection, OpenAIConnection
        custom = CustomConnection(secrets={"token": "t"}, configs={"endpoint": "e"}, name="c")
        assert custom.token == "t" and custom.endpoint == "e" and custom.is_secret("token")
        assert custom["endpoint"] == "e" and sorted(custom.keys()) == ["endpoint", "token"]
        azure = AzureOpenAIConnection(api_base="https://x", api_key="k")
        assert (azure.api_base, azure.api_key, azure.api_version, azure.api_type) == ("https://x", "k", "2024-02-01", "azure")
        openai = OpenAIConnection(api_key="k", base_url="")
        assert openai.base_url is None and openai.api_key == "k"
        print("ok", importlib.util.find_spec("promptflow").origin)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ") and "flowengine/compat/promptflow" in done.stdout


def test_runner_connections_convert_to_and_from_prompt_flow_objects():
    import flowengine.compat._connections as module

    conn = Connection.open_ai("o", api_key="k", base_url="http://h/v1")
    obj = to_promptflow_connection(conn, module)
    assert type(obj).__name__ == "OpenAIConnection" and obj.base_url == "http://h/v1" and obj.name == "o"
    assert from_promptflow_connection(obj) == Connection.open_ai("o", api_key="k", base_url="http://h/v1")
    custom = to_promptflow_connection(
        Connection(name="c", type="custom", configs={"a": 1}, secrets={"s": "x"}), module
    )
    assert custom.s == "x" and custom.a == 1


def test_log_metric_reaches_the_installed_collector_only():
    hooks.log_metric("ignored", 1.0)
    with hooks.collect_metrics() as metrics:
        hooks.log_metric("accuracy", 0.5)
        hooks.log_metric("accuracy", 0.75, variant_id="variant_1")
        hooks.log_metric("count", 3)
    assert metrics.as_dict() == {"accuracy": 0.75, "count": 3}
    assert metrics.items[1].variant_id == "variant_1"


async def test_trace_emits_nested_spans_across_threads():
    spans: list[dict] = []

    @hooks.trace
    def inner(x: int) -> int:
        return x * 2

    @hooks.trace
    async def outer(x: int) -> int:
        return await asyncio.to_thread(inner, x) + 1

    @hooks.trace
    def words():
        yield "a"
        yield "b"

    with hooks.collect_spans(spans.append, parent_id="node-span"):
        assert await outer(2) == 5
        assert list(words()) == ["a", "b"]
    by_name = {s["name"].rsplit(".", 1)[-1]: s for s in spans}
    assert by_name["inner"]["parent_id"] == by_name["outer"]["span_id"]
    assert by_name["outer"]["parent_id"] == "node-span"
    assert by_name["outer"]["inputs"] == {"x": 2} and by_name["outer"]["output"] == 5
    assert by_name["words"]["output"] == "ab"
    assert outer.__name__ == "outer"


def test_trace_without_collector_is_transparent():
    @hooks.trace
    def f(a, b=2):
        return a + b

    assert f(1) == 3
