"""The management API: pools created, changed and deleted at runtime."""

from __future__ import annotations

import time

from harness.api import Api, describe, error_code, new_id


def wait_ready(mgmt, name: str, n: int, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mgmt.pool(name)["properties"]["readySessions"] >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"pool {name} never had {n} ready sessions: {mgmt.pool(name)}")


def test_pool_created_used_and_deleted_at_runtime(tcp, unix, mgmt):
    name = "rt-" + new_id("p")[2:10]
    body = {
        "properties": {
            "containerType": "PythonLTS",
            "scaleConfiguration": {"maxConcurrentSessions": 2, "readySessionInstances": 1},
            "dynamicPoolConfiguration": {"lifecycleConfiguration": {"lifecycleType": "Timed", "cooldownPeriodInSeconds": 60}},
            "sessionNetworkConfiguration": {"status": "EgressDisabled"},
            "memory": "512Mi",
        }
    }
    r = unix.put(f"/management/pools/{name}", json=body)
    assert r.status_code == 201, describe(r)
    props = r.json()["properties"]
    assert props["scaleConfiguration"]["maxConcurrentSessions"] == 2
    assert props["poolManagementEndpoint"].endswith(f"/pools/{name}")
    assert props["backend"] == "jail"
    assert props["isolation"], props
    try:
        wait_ready(mgmt, name, 1)
        api = Api(tcp, name)
        ident = new_id()
        assert api.run(ident, "'runtime pool'") == "runtime pool"
        sessions = unix.get(f"/management/pools/{name}/sessions").json()["value"]
        assert [s["identifier"] for s in sessions] == [ident]

        # Changing the pool keeps its sessions.
        body["properties"]["scaleConfiguration"]["maxConcurrentSessions"] = 3
        r = unix.put(f"/management/pools/{name}", json=body)
        assert r.status_code == 200, describe(r)
        assert mgmt.pool(name)["properties"]["scaleConfiguration"]["maxConcurrentSessions"] == 3
        assert api.run(ident, "'still here'") == "still here"
    finally:
        r = unix.delete(f"/management/pools/{name}")
        assert r.status_code == 204, describe(r)
    r = unix.get(f"/management/pools/{name}")
    assert r.status_code == 404, describe(r)
    r = tcp.post(f"/pools/{name}/code/execute", params={"identifier": new_id(), "api-version": "2024-02-02-preview"}, json={"properties": {"code": "1"}})
    assert r.status_code == 404, describe(r)


def test_invalid_pool_definitions_are_refused(unix):
    cases = [
        ("Bad_Name", {}, "InvalidPoolProperties"),
        ("okname", {"properties": {"scaleConfiguration": {"maxConcurrentSessions": 0}}}, "InvalidPoolProperties"),
        ("okname", {"properties": {"containerType": "NoSuchType"}}, "InvalidPoolProperties"),
        ("okname", {"properties": {"maxSessions": 3}}, "InvalidPoolProperties"),
        ("okname", {"properties": {"memory": "lots"}}, "InvalidPoolProperties"),
        ("okname", {"properties": {"sessionNetworkConfiguration": {"status": "EgressEnabled"}}}, "SessionPoolFeatureNotSupported"),
        ("okname", {"properties": {"containerType": "CustomContainer"}}, "SessionPoolFeatureNotSupported"),
    ]
    for name, body, code in cases:
        r = unix.put(f"/management/pools/{name}", json=body)
        assert r.status_code == 400, describe(r)
        assert error_code(r) == code, (body, r.text)
    r = unix.put("/management/pools/okname", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400, describe(r)
    assert unix.get("/management/pools/okname").status_code == 404


def test_config_pools_cannot_be_deleted_through_the_api(unix, mgmt):
    r = unix.delete("/management/pools/py")
    assert r.status_code == 409, describe(r)
    assert error_code(r) == "PoolManagedByConfig"
    assert "py" in mgmt.pools()


def test_health_and_metrics(daemon, unix):
    r = unix.get("/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["backend"] == "jail"
    r = unix.get("/metrics")
    assert r.status_code == 200, describe(r)
    assert "sessiond" in r.text
