from tests.test_authz_matrix import WS_ROUTES, WS_KWARGS, ORIGIN, _cookie, _ws_connect, url_for, world  # noqa
import pytest
pytestmark = pytest.mark.django_db(databases="__all__")

def test_owner_connects(world):
    for route, name, kwargs in WS_ROUTES:
        path = url_for(route, {k: str(WS_KWARGS[k](world)) for k in kwargs})
        print(path, _ws_connect(path, [ORIGIN, _cookie(world.owner)]))
