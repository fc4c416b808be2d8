"""Paths under /api/v1/ that match no route answer with the API's JSON 404, whatever the method."""

from __future__ import annotations

import pytest
from django.test import Client


@pytest.mark.parametrize("method", ["get", "post", "put", "patch", "delete"])
def test_a_path_no_route_matches_gets_a_json_404_for_every_method(method):
    client = Client(enforce_csrf_checks=True)

    response = getattr(client, method)("/api/v1/flows/-1/files/%0Aj%10?based_on=x")

    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert "There is no API route" in response.json()["detail"]
