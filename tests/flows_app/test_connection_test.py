"""connection_test makes one real call with the openai SDK against the fake LLM server, never echoing a key."""

from __future__ import annotations

import socket

import pytest

from flows_app.services import connection_create, connection_test

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """The personas are created with passwords; a fast hasher keeps these tests quick."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_listing_models_succeeds_against_an_openai_compatible_server(owner, fake_llm):
    conn = connection_create(
        owner=owner, name="local", type="openai_compatible", configs={"base_url": fake_llm.base_url}
    )
    result = connection_test(connection=conn)
    assert result.ok, result.message
    assert result.message == f"Connected to {fake_llm.base_url}: 2 model(s) available."
    assert fake_llm.requests()[-1]["path"] == "/v1/models"


def test_with_a_default_model_a_one_token_chat_is_made_with_the_key(owner, fake_llm):
    fake_llm.config(api_key="sk-the-right-key-0001")
    conn = connection_create(
        owner=owner,
        name="oa",
        type="open_ai",
        configs={"base_url": fake_llm.base_url, "model": "fake-gpt"},
        secrets={"api_key": "sk-the-right-key-0001"},
    )
    result = connection_test(connection=conn)
    assert result.ok, result.message
    assert "fake-gpt" in result.message
    request = fake_llm.requests()[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["max_tokens"] == 1
    assert request["headers"]["authorization"] == "Bearer sk-the-right-key-0001"


def test_azure_connection_calls_the_deployment(owner, fake_llm):
    conn = connection_create(
        owner=owner,
        name="az",
        type="azure_open_ai",
        configs={"api_base": fake_llm.url, "api_version": "2024-10-21", "model": "my-deployment"},
        secrets={"api_key": "azure-key-123456"},
    )
    result = connection_test(connection=conn)
    assert result.ok, result.message
    request = fake_llm.requests()[-1]
    assert request["path"] == "/openai/deployments/my-deployment/chat/completions"
    assert request["headers"]["api-key"] == "azure-key-123456"


def test_closed_port_gives_a_clear_connection_error(owner):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    conn = connection_create(owner=owner, name="down", type="openai_compatible", configs={"base_url": url})
    result = connection_test(connection=conn, timeout=3)
    assert not result.ok
    assert result.message.startswith(f"Could not connect to {url}")


def test_wrong_key_is_reported_without_any_part_of_the_key(owner, fake_llm):
    fake_llm.config(api_key="sk-the-right-key-0001")
    wrong = "sk-wrong-key-abcdefgh-9876"
    conn = connection_create(
        owner=owner,
        name="oa",
        type="open_ai",
        configs={"base_url": fake_llm.base_url},
        secrets={"api_key": wrong},
    )
    result = connection_test(connection=conn)
    assert not result.ok
    assert result.message == f"{fake_llm.base_url} refused the API key (HTTP 401)."
    assert "9876" not in result.message


def test_server_error_status_is_reported(owner, fake_llm):
    fake_llm.config(fail_next=[500], fail_message="overloaded")
    conn = connection_create(
        owner=owner,
        name="oa",
        type="openai_compatible",
        configs={"base_url": fake_llm.base_url, "model": "fake-gpt"},
    )
    result = connection_test(connection=conn)
    assert not result.ok
    assert result.message == f"{fake_llm.base_url} answered HTTP 500: overloaded"


def test_a_slow_server_times_out_within_the_limit(owner, fake_llm):
    fake_llm.config(latency_ms=3000)
    conn = connection_create(
        owner=owner,
        name="slow",
        type="openai_compatible",
        configs={"base_url": fake_llm.base_url, "model": "fake-gpt"},
    )
    result = connection_test(connection=conn, timeout=0.5)
    assert not result.ok
    assert result.message == f"No answer from {fake_llm.base_url} within 0.5 seconds."


def test_server_environment_credentials_are_never_sent(owner, fake_llm, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-server-env-key")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-server-env")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-server-env")
    conn = connection_create(
        owner=owner, name="local", type="openai_compatible", configs={"base_url": fake_llm.base_url}
    )
    assert connection_test(connection=conn).ok
    headers = fake_llm.requests()[-1]["headers"]
    assert "server-env" not in " ".join(headers.values())
