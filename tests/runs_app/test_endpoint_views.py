"""The deploy wizard and the endpoint pages: allowed, outsider, anonymous and htmx paths."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from flows_app.services import connection_create, files_from_folder, flow_create
from runs_app import selectors, services
from runs_app.models import Deployment, Endpoint, EndpointKey, EndpointRequest, Run
from runs_app.services import dataset_create, run_create

pytestmark = pytest.mark.django_db

FLOWS = Path(__file__).resolve().parents[1] / "data" / "flows"
HTMX = {"HTTP_HX_REQUEST": "true"}
KEY = re.compile(r"fse_[A-Za-z0-9_-]{43}")


def _client(user=None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


@pytest.fixture(autouse=True)
def _private_data_dir(settings, tmp_path):
    """Deploying materialises snapshots under DATA_DIR: keep them out of the developer's data folder."""
    settings.DATA_DIR = tmp_path


@pytest.fixture
def chat_flow(owner):
    """The owner's copy of the corpus chat flow (llm node on connection `fake_openai`, python turn counter)."""
    connection_create(
        owner=owner,
        name="fake_openai",
        type="open_ai",
        configs={"base_url": "http://127.0.0.1:9/v1"},
        secrets={"api_key": "sk-view-tests"},
    )
    files = files_from_folder(root=FLOWS / "dag_chat")
    return flow_create(
        owner=owner, name="chat", files={p: d for p, d in files.items() if not p.endswith(".json")}
    )


@pytest.fixture
def run(owner, chat_flow) -> Run:
    """A run of the chat flow over two questions (its chunks never execute here: only its snapshot matters)."""
    dataset = dataset_create(
        owner=owner, name="questions", filename="q.jsonl", data=b'{"question": "a"}\n{"question": "b"}\n'
    )
    return run_create(
        user=owner,
        flow_version=chat_flow.head,
        dataset=dataset,
        column_mapping={"question": "${data.question}"},
    )


@pytest.fixture
def endpoint(owner, run) -> Endpoint:
    """Endpoint `chat-ep` serving the run as deployment `blue`."""
    deployment, _ = services.deployment_create(user=owner, endpoint="chat-ep", deployment="blue", run=run)
    return deployment.endpoint


def _wizard_post(**changes: str) -> dict[str, str]:
    data = {
        "endpoint_mode": "new",
        "endpoint_name": "chat-ep",
        "deployment": "blue",
        "instance_count": "1",
        "auth_mode": "key",
        "outputs": ["answer", "turns"],
        "conn__fake_openai": "fake_openai",
    }
    data.update(changes)
    return data


def test_wizard_from_a_run_shows_the_four_steps_with_the_flows_outputs_and_connections(owner, run):
    resp = _client(owner).get(reverse("endpoints:deploy_run", args=[run.pk]))
    assert resp.status_code == 200
    html = resp.content.decode()
    for step in ("Basic settings", "Endpoint auth", "Outputs &amp; connections", "Review + create"):
        assert step in html
    assert 'name="outputs" value="answer"' in html and 'name="outputs" value="turns"' in html
    assert 'name="conn__fake_openai"' in html
    assert run.snapshot_id in html


def test_wizard_creates_the_endpoint_and_reveals_both_keys_once(owner, run):
    resp = _client(owner).post(reverse("endpoints:deploy_run", args=[run.pk]), _wizard_post())
    assert resp.status_code == 201
    html = resp.content.decode()
    keys = KEY.findall(html)
    assert len(set(keys)) == 2
    deployment = Deployment.objects.get(endpoint__name="chat-ep", name="blue")
    assert (deployment.snapshot_id, deployment.run_id, deployment.traffic) == (run.snapshot_id, run.pk, 100)
    assert deployment.outputs == []  # all of them
    stored = set(EndpointKey.objects.values_list("key_hash", flat=True))
    assert stored == {services.endpoint_key_hash(k) for k in set(keys)}
    assert not any(k in str(list(EndpointKey.objects.values())) for k in keys)
    # Later visits show prefixes only.
    again = _client(owner).get(reverse("endpoints:consume", args=["chat-ep"])).content.decode()
    assert not KEY.search(again)
    assert keys[0][:10] in again


def test_wizard_keeps_the_chosen_outputs_and_refuses_a_taken_name(owner, outsider, run, endpoint):
    taken = _client(owner).post(reverse("endpoints:deploy_run", args=[run.pk]), _wizard_post())
    assert taken.status_code == 422
    assert "You already have an endpoint" in taken.content.decode()

    resp = _client(owner).post(
        reverse("endpoints:deploy_run", args=[run.pk]),
        _wizard_post(endpoint_mode="existing", endpoint="chat-ep", deployment="green", outputs=["answer"]),
    )
    assert resp.status_code == 201
    green = Deployment.objects.get(endpoint=endpoint, name="green")
    assert (green.outputs, green.traffic) == (["answer"], 0)
    assert not KEY.search(resp.content.decode())  # an existing endpoint's keys are not shown again


def test_wizard_refuses_a_connection_the_user_does_not_have(owner, run):
    resp = _client(owner).post(
        reverse("endpoints:deploy_run", args=[run.pk]), _wizard_post(conn__fake_openai="")
    )
    assert resp.status_code == 422
    assert "Pick the connection that serves &#x27;fake_openai&#x27;" in resp.content.decode()
    assert not Endpoint.objects.exists()
    with pytest.raises(services.EndpointError, match=r"you have no connection 'nope' \(for 'fake_openai'\)"):
        services.deployment_create(
            user=owner, endpoint="chat-ep", deployment="blue", run=run, connections={"fake_openai": "nope"}
        )


def test_wizard_from_the_flow_page_deploys_the_head_version(owner, chat_flow):
    page = _client(owner).get(reverse("flows:detail", args=[chat_flow.pk])).content.decode()
    assert reverse("endpoints:deploy_flow", args=[chat_flow.pk]) in page
    resp = _client(owner).post(reverse("endpoints:deploy_flow", args=[chat_flow.pk]), _wizard_post())
    assert resp.status_code == 201
    deployment = Deployment.objects.get(name="blue")
    assert (deployment.snapshot_id, deployment.flow_version_id) == (
        chat_flow.head.snapshot_id,
        chat_flow.head_id,
    )


def test_run_page_links_to_the_wizard_once_the_run_is_finished(owner, run):
    url = reverse("endpoints:deploy_run", args=[run.pk])
    assert url not in _client(owner).get(reverse("runs:detail", args=[run.pk])).content.decode()
    Run.objects.filter(pk=run.pk).update(status="Completed")
    assert url in _client(owner).get(reverse("runs:detail", args=[run.pk])).content.decode()


@pytest.mark.parametrize("name", ["detail", "test", "consume", "monitoring"])
def test_endpoint_tabs_are_the_owners_only(name, owner, teammate, outsider, endpoint):
    url = reverse(f"endpoints:{name}", args=["chat-ep"])
    resp = _client(owner).get(url)
    assert resp.status_code == 200
    assert "chat-ep" in resp.content.decode()
    assert _client(outsider).get(url).status_code == 404
    assert _client(teammate).get(url).status_code == 404
    anonymous = _client().get(url)
    assert anonymous.status_code == 302 and "/login" in anonymous["Location"]


def test_outsider_gets_404_for_the_wizard_and_every_endpoint_action(owner, outsider, run, endpoint):
    client = _client(outsider)
    assert client.get(reverse("endpoints:deploy_run", args=[run.pk])).status_code == 404
    assert (
        client.post(reverse("endpoints:traffic", args=["chat-ep"]), {"traffic__blue": "0"}).status_code == 404
    )
    assert client.post(reverse("endpoints:toggle", args=["chat-ep"]), {"disabled": "1"}).status_code == 404
    assert client.post(reverse("endpoints:regenerate", args=["chat-ep", "primary"])).status_code == 404
    assert client.post(reverse("endpoints:delete", args=["chat-ep"])).status_code == 404
    assert client.get(reverse("endpoints:list")).content.decode().count("chat-ep") == 0
    endpoint.refresh_from_db()
    assert not endpoint.disabled


def test_list_shows_the_owners_endpoints_with_their_traffic(owner, endpoint):
    html = _client(owner).get(reverse("endpoints:list")).content.decode()
    assert reverse("endpoints:detail", args=["chat-ep"]) in html
    assert "blue 100%" in html


def test_traffic_split_must_add_up_to_100_and_htmx_gets_the_fragment(owner, run, endpoint):
    services.deployment_create(user=owner, endpoint="chat-ep", deployment="green", run=run)
    url = reverse("endpoints:traffic", args=["chat-ep"])
    bad = _client(owner).post(url, {"traffic__blue": "60", "traffic__green": "30"}, **HTMX)
    assert bad.status_code == 422
    assert "add up to 90%" in bad.content.decode()
    assert "<html" not in bad.content.decode()
    good = _client(owner).post(url, {"traffic__blue": "10", "traffic__green": "90"}, **HTMX)
    assert good.status_code == 200 and good["HX-Redirect"] == reverse("endpoints:detail", args=["chat-ep"])
    assert dict(Deployment.objects.values_list("name", "traffic")) == {"blue": 10, "green": 90}


def test_regenerating_a_key_on_the_page_shows_the_new_one_once(owner, endpoint):
    old = EndpointKey.objects.get(endpoint=endpoint, slot="secondary").key_hash
    resp = _client(owner).post(reverse("endpoints:regenerate", args=["chat-ep", "secondary"]))
    assert resp.status_code == 200
    shown = KEY.findall(resp.content.decode())
    assert len(set(shown)) == 1
    new = EndpointKey.objects.get(endpoint=endpoint, slot="secondary").key_hash
    assert new != old and new == services.endpoint_key_hash(shown[0])


def test_disable_and_enable_from_the_page(owner, endpoint):
    url = reverse("endpoints:toggle", args=["chat-ep"])
    assert _client(owner).post(url, {"disabled": "1"}).status_code == 302
    assert Endpoint.objects.get(pk=endpoint.pk).disabled
    _client(owner).post(url, {"disabled": "0"})
    assert not Endpoint.objects.get(pk=endpoint.pk).disabled


def test_test_tab_offers_a_chat_with_a_short_lived_credential(owner, endpoint):
    html = _client(owner).get(reverse("endpoints:test", args=["chat-ep"])).content.decode()
    assert 'data-chat-input="question"' in html and 'data-chat-output="answer"' in html
    token = re.search(r'data-token="([^"]+)"', html).group(1)
    auth = services.endpoint_authenticate(name="chat-ep", credential=token)
    assert auth is not None and auth.endpoint_id == endpoint.pk
    assert services.endpoint_authenticate(name="other-ep", credential=token) is None


def test_consume_tab_has_url_and_snippets_in_three_languages(owner, endpoint):
    html = _client(owner).get(reverse("endpoints:consume", args=["chat-ep"])).content.decode()
    assert "http://testserver/endpoints/chat-ep/score" in html
    assert "curl -N" in html and "sseclient" in html and "fetch(" in html
    assert "&quot;question&quot;" in html


def test_monitoring_counts_errors_and_percentiles_per_window_and_htmx_gets_the_panel(owner, endpoint):
    now = timezone.now()
    blue = endpoint.deployments.get()
    rows = [(200, 100.0, 10), (200, 200.0, 20), (500, 300.0, 0), (200, 400.0, 30)]
    for i, (status, latency, tokens) in enumerate(rows):
        EndpointRequest.objects.create(
            endpoint=endpoint,
            deployment=blue,
            time=now - dt.timedelta(minutes=5 * i),
            status=status,
            latency_ms=latency,
            total_tokens=tokens,
        )
    EndpointRequest.objects.create(
        endpoint=endpoint, time=now - dt.timedelta(days=3), status=200, latency_ms=1.0, total_tokens=1
    )
    report = selectors.endpoint_monitoring(endpoint, window="1h", now=now)
    assert report["total"] == {"requests": 4, "errors": 1, "p50": 200.0, "p95": 400.0, "tokens": 60}
    assert sum(b["requests"] for b in report["series"]) == 4
    assert selectors.endpoint_monitoring(endpoint, window="7d", now=now)["total"]["requests"] == 5

    page = _client(owner).get(reverse("endpoints:monitoring", args=["chat-ep"]) + "?window=1h", **HTMX)
    html = page.content.decode()
    assert page.status_code == 200 and "<html" not in html
    assert 'id="monitor-data"' in html and "data-total-errors>1<" in html


def test_a_share_out_of_range_is_named_next_to_its_deployment(owner, endpoint):
    resp = _client(owner).post(
        reverse("endpoints:traffic", args=["chat-ep"]), {"traffic__blue": "150"}, **HTMX
    )
    assert resp.status_code == 422
    assert "less than or equal to 100" in resp.content.decode()
    assert Deployment.objects.get().traffic == 100
