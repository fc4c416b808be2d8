"""Endpoint and deployment services: keys, the cached key check, traffic rules, immutability, request rows."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.exceptions import PermissionDenied
from django.utils import timezone

from flows_app.services import connection_create, files_from_folder, flow_create, flow_file_save
from runs_app import services
from runs_app.models import Deployment, Endpoint, EndpointKey, EndpointRequest

pytestmark = pytest.mark.django_db

FLOWS = Path(__file__).resolve().parents[1] / "data" / "flows"


@pytest.fixture(autouse=True)
def _private_data_dir(settings, tmp_path):
    """Deploying materialises snapshots under DATA_DIR: keep them out of the developer's data folder."""
    settings.DATA_DIR = tmp_path


@pytest.fixture
def flow(owner):
    """The owner's pure-python `dag_basic` flow (no connections needed)."""
    return flow_create(owner=owner, name="basic", files=files_from_folder(root=FLOWS / "dag_basic"))


@pytest.fixture
def deployed(owner, flow):
    """Endpoint `basic-ep` with deployment `blue` of the flow's head, and its two keys."""
    deployment, keys = services.deployment_create(
        user=owner, endpoint="basic-ep", deployment="blue", flow_version=flow.head
    )
    return deployment, keys


def test_keys_are_256_bit_and_stored_as_sha256_only(deployed):
    deployment, keys = deployed
    stored = {k.slot: k for k in EndpointKey.objects.filter(endpoint=deployment.endpoint)}
    assert set(stored) == {"primary", "secondary"}
    for slot, key in (("primary", keys.primary), ("secondary", keys.secondary)):
        assert key.startswith("fse_") and len(key) == 4 + 43
        assert stored[slot].key_hash == services.endpoint_key_hash(key)
        assert stored[slot].prefix == key[:10]


def test_a_key_opens_only_its_own_endpoint(owner, flow, deployed):
    _, keys = deployed
    services.deployment_create(user=owner, endpoint="other-ep", deployment="blue", flow_version=flow.head)
    auth = services.endpoint_authenticate(name="basic-ep", credential=keys.primary)
    assert auth is not None and [d.name for d in auth.deployments] == ["blue"]
    assert services.endpoint_authenticate(name="other-ep", credential=keys.primary) is None
    assert services.endpoint_authenticate(name="basic-ep", credential=keys.primary + "x") is None


def test_regenerating_drops_the_cached_check_when_the_change_commits(
    owner, deployed, django_capture_on_commit_callbacks
):
    deployment, keys = deployed
    assert services.endpoint_authenticate(name="basic-ep", credential=keys.primary) is not None
    assert services.endpoint_auth_cached("basic-ep", keys.primary) is not None
    with django_capture_on_commit_callbacks(execute=True):
        new = services.endpoint_key_regenerate(user=owner, endpoint=deployment.endpoint, slot="primary")
    assert services.endpoint_auth_cached("basic-ep", keys.primary) is None
    assert services.endpoint_authenticate(name="basic-ep", credential=keys.primary) is None
    assert services.endpoint_authenticate(name="basic-ep", credential=new) is not None
    assert services.endpoint_authenticate(name="basic-ep", credential=keys.secondary) is not None


def test_disabling_reaches_the_cached_check_on_commit(owner, deployed, django_capture_on_commit_callbacks):
    deployment, keys = deployed
    services.endpoint_authenticate(name="basic-ep", credential=keys.primary)
    with django_capture_on_commit_callbacks(execute=True):
        services.endpoint_update(user=owner, endpoint=deployment.endpoint, disabled=True)
    assert services.endpoint_auth_cached("basic-ep", keys.primary) is None
    assert services.endpoint_authenticate(name="basic-ep", credential=keys.primary).disabled


def test_only_the_owner_changes_an_endpoint(teammate, deployed):
    deployment, _ = deployed
    with pytest.raises(PermissionDenied):
        services.endpoint_key_regenerate(user=teammate, endpoint=deployment.endpoint, slot="primary")
    with pytest.raises(PermissionDenied):
        services.endpoint_update(user=teammate, endpoint=deployment.endpoint, disabled=True)
    with pytest.raises(PermissionDenied):
        services.endpoint_delete(user=teammate, endpoint=deployment.endpoint)


def test_a_deployment_keeps_its_snapshot_when_the_flow_changes(owner, flow, deployed):
    deployment, _ = deployed
    before = deployment.snapshot_id
    flow_file_save(flow=flow, user=owner, path="notes.txt", content=b"changed", based_on=flow.head.number)
    flow.refresh_from_db()
    assert flow.head.snapshot_id != before
    assert Deployment.objects.get(pk=deployment.pk).snapshot_id == before


@pytest.mark.parametrize(
    ("traffic", "message"),
    [
        ({"blue": 60, "green": 30}, "add up to 90%"),
        ({"blue": 101, "green": 0}, "from 0 to 100"),
        ({"blue": "half"}, "whole percent"),
        ({"purple": 100}, "no deployment 'purple'"),
    ],
)
def test_traffic_split_is_checked(owner, flow, deployed, traffic, message):
    deployment, _ = deployed
    services.deployment_create(user=owner, endpoint="basic-ep", deployment="green", flow_version=flow.head)
    with pytest.raises(services.EndpointError, match=message):
        services.endpoint_update(user=owner, endpoint=deployment.endpoint, traffic=traffic)
    assert dict(Deployment.objects.values_list("name", "traffic")) == {"blue": 100, "green": 0}


def test_a_deployment_with_traffic_cannot_be_deleted_while_another_exists(owner, flow, deployed):
    blue, _ = deployed
    green, keys = services.deployment_create(
        user=owner, endpoint="basic-ep", deployment="green", flow_version=flow.head
    )
    assert keys is None
    with pytest.raises(services.EndpointError, match="move it to another deployment first"):
        services.deployment_delete(user=owner, deployment=blue)
    services.endpoint_update(user=owner, endpoint=blue.endpoint, traffic={"green": 100})
    services.deployment_delete(user=owner, deployment=Deployment.objects.get(pk=blue.pk))
    assert list(Deployment.objects.values_list("name", flat=True)) == ["green"]


def test_names_are_checked_and_taken_names_refused(owner, outsider, flow, deployed):
    with pytest.raises(services.EndpointError, match="not a valid name"):
        services.deployment_create(user=owner, endpoint="Bad_Name", deployment="blue", flow_version=flow.head)
    with pytest.raises(services.EndpointError, match="already has a deployment 'blue'") as exc:
        services.deployment_create(user=owner, endpoint="basic-ep", deployment="blue", flow_version=flow.head)
    assert exc.value.status == 409
    other = flow_create(owner=outsider, name="x", files=files_from_folder(root=FLOWS / "dag_basic"))
    with pytest.raises(services.EndpointError, match="is taken"):
        services.deployment_create(
            user=outsider, endpoint="basic-ep", deployment="blue", flow_version=other.head
        )


def test_unknown_outputs_are_named(owner, flow):
    with pytest.raises(services.EndpointError, match="no output 'nope'"):
        services.deployment_create(
            user=owner, endpoint="basic-ep", deployment="blue", flow_version=flow.head, outputs=["nope"]
        )
    assert not Endpoint.objects.exists()


def test_serving_spec_hands_renamed_connections_to_the_runner_only(owner):
    connection_create(
        owner=owner,
        name="staging_llm",
        type="open_ai",
        configs={"base_url": "http://127.0.0.1:9/v1"},
        secrets={"api_key": "sk-staging"},
    )
    files = {p: d for p, d in files_from_folder(root=FLOWS / "dag_chat").items() if not p.endswith(".json")}
    chat = flow_create(owner=owner, name="chat", files=files)
    deployment, _ = services.deployment_create(
        user=owner,
        endpoint="chat-ep",
        deployment="blue",
        flow_version=chat.head,
        connections={"fake_openai": "staging_llm"},
    )
    assert deployment.connection_overrides == {"fake_openai": "staging_llm"}
    spec = services.deployment_serving(deployment_id=deployment.pk)
    assert spec.connections["fake_openai"].secrets == {"api_key": "sk-staging"}
    assert spec.connections["fake_openai"].name == "fake_openai"
    assert (spec.flow_name, spec.snapshot, spec.limits.cpu_seconds) == ("chat", chat.head.snapshot_id, None)
    assert "sk-staging" not in str(Deployment.objects.filter(pk=deployment.pk).values().get())


def test_request_rows_of_deleted_endpoints_and_deployments_are_dropped_or_kept_without_deployment(
    owner, deployed
):
    deployment, _ = deployed
    now = timezone.now()
    row = {"endpoint_id": deployment.endpoint_id, "time": now, "status": 200, "latency_ms": 5.0}
    written = services.endpoint_requests_record(
        rows=[
            {**row, "deployment_id": deployment.pk, "total_tokens": 7},
            {**row, "deployment_id": deployment.pk + 1000},
            {**row, "endpoint_id": deployment.endpoint_id + 1000, "deployment_id": None},
        ]
    )
    assert written == 2
    rows = set(EndpointRequest.objects.values_list("deployment_id", "total_tokens"))
    assert rows == {(deployment.pk, 7), (None, 0)}


def test_test_tokens_expire(owner, deployed, monkeypatch):
    deployment, _ = deployed
    token = services.endpoint_test_token(user=owner, endpoint=deployment.endpoint)
    assert services.endpoint_authenticate(name="basic-ep", credential=token) is not None
    monkeypatch.setattr(services, "ENDPOINT_TEST_TOKEN_SECONDS", -1)
    assert services.endpoint_authenticate(name="basic-ep", credential=token) is None
