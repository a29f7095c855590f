"""Fixtures of the e2e tier shared by several files: one Ray cluster that the RayJobs join, real fraud model
packages of two versions, and one real digits (image) package that the serving and the training tests
both inspect."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _rollout_support import republish
from _serving_support import fraud_config, train_package
from _training_support import start_local_ray, stop_ray_head


class RayHead:
    """The session's Ray cluster (``conveyor_devstack.rayhead``, as ``make demo`` keeps one): a RayJob's
    entrypoint joins it through RAY_ADDRESS, as on Kubernetes it joins the cluster KubeRay brought up,
    instead of starting a Ray of its own and stopping it after registering (on two busy cores, tens of
    seconds each way, for every training run). Started on first use; stopped once no test left in the
    session asks for it (``pytest_runtest_teardown`` below), so later tiers do not share the cores with
    an idle Ray."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self._address: str | None = None

    def address(self) -> str:
        if self._address is None:
            from conveyor_devstack import rayhead

            self._address = rayhead.up(self.state)
        return self._address

    def down(self) -> None:
        if self._address is not None:
            stop_ray_head(self.state)
            self._address = None


_HEAD: RayHead | None = None


@pytest.fixture(scope="session")
def _ray_head_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    global _HEAD
    _HEAD = RayHead(tmp_path_factory.mktemp("ray-head"))
    try:
        yield _HEAD
    finally:
        _HEAD.down()
        _HEAD = None


@pytest.fixture
def ray_head(_ray_head_session: RayHead, monkeypatch: pytest.MonkeyPatch) -> str:
    """The session Ray's address, in RAY_ADDRESS for this test: the local executor started by the test
    hands it to the RayJob entrypoints it runs (and the predictors, which do not use Ray)."""
    address = _ray_head_session.address()
    monkeypatch.setenv("RAY_ADDRESS", address)
    return address


# The fixtures through which a test uses the Ray started inside this process (start_local_ray).
IN_PROCESS_RAY = ("digits_run", "ray_cluster", "ray_local")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    yield  # the test's own fixtures (its executor, its runs) are torn down first
    items = item.session.items
    rest = items[items.index(item) + 1 :] if item in items else []
    # (fraud_versions, once made, needs it no more; made later, it starts the head again.)
    if _HEAD is not None and not any("ray_head" in getattr(i, "fixturenames", ()) for i in rest):
        _HEAD.down()
    # The in-process Ray likewise, once no test left asks for it: idle, it took ~9% of a core for the
    # rest of the session (the integration, placement and unit tiers); stopping it takes ~2 s.
    if "ray" in sys.modules and not any(
        name in getattr(i, "fixturenames", ()) for i in rest for name in IN_PROCESS_RAY
    ):
        import ray

        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="session")
def fraud_versions(
    _ray_head_session: RayHead, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, list[str]]:
    """(registry URI, [v1 URI, v2 URI]) of a small real fraud model: v1 from a real training run (joining
    the session's Ray), v2 the same trained package committed again as the next version through the
    registry (a second training run would add minutes on two shared cores; the rollout tests tell the
    versions apart by what each predictor reports and by the faults planted in one of them, not by
    their weights)."""
    registry = tmp_path_factory.mktemp("versions-registry")
    config = fraud_config(str(registry), rows=1000, epochs=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ADDRESS", _ray_head_session.address())
        try:
            v1 = train_package(config, registry.parent / "versions-train")
        except RuntimeError:
            # Ray's node start times out when the shared cores are saturated; once more, then fail.
            v1 = train_package(config, registry.parent / "versions-train")
    v2 = republish(Path(v1), f"file://{registry}", "fraud")
    assert v2 == "v2", v2
    return f"file://{registry}", [v1, str(registry / "fraud" / v2)]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    """(RunConfig, ModelPackage) of the sample digits run (``quick_config("digits")``: 8x8 images, a small
    CNN, ten epochs, gated on accuracy 0.9, pixels declared 0..16), trained once in this process on a
    local Ray (2 CPUs) for the session: test_training checks what it learned, test_serving serves it
    (an image model over V1 base64 and V2 bytes, its drift and saliency maps). Training a second digits
    package for the serving tests cost ~50 s of a two-core machine."""
    from conveyor.runtime.package.registry import open_package
    from conveyor.runtime.training.run import train_and_register
    from conveyor.runtime.training.samples import quick_config

    start_local_ray(num_cpus=2)
    config = quick_config("digits", str(tmp_path_factory.mktemp("digits-registry")))
    return config, open_package(train_and_register(config))
