"""The dashboard in headless Chromium (Debian's chromium and chromium-driver, through Selenium) against a
running hub on Mosquitto with three real agents: log in, see the agents online, deploy from the CLI and
watch the progress on an open page without a reload, open a device and see its latency chart, a viewer
cannot press the operator's buttons, a wrong token is refused on the login form.

With EDGEFED_SCREENSHOTS=1 it writes a screenshot of each page to docs/screenshots/ (docs/dashboard.md
shows them); without it the docs are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from common import artifact, gemm_onnx
from conftest import MosquittoProcess, wait_for
from dashboard_browser import PAGES, Browser, missing
from rollout_fleet import Device, start_fleet
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from typer.testing import CliRunner

from cloud_hub.api_client import AdminClient
from cloud_hub.cli import app as hub_cli
from cloud_hub.server import Hub, HubConfig, operator_token
from edge_agent import EdgeClient

DEVICES = 3
DASH = "\u2013"  # the en dash of the fleet pager's ranges (1-25 of 63)
MODEL = "gemm"


class Stack:
    """Mosquitto, a hub on it, three agents (dev-00..dev-02, group fleet), versions 1.1.0 and 1.2.0 of a
    Gemm model registered; what the tests did so far (the deployment, the rollout, the viewer token)."""

    def __init__(self, work: Path, keys: tuple[Path, Path]) -> None:
        self.deployment_id: str | None = None
        self.rollout_id: str | None = None
        self.settled = False
        self.devices: list[Device] = []
        self.hub: Hub | None = None
        self.broker = MosquittoProcess(work)
        try:
            self._start(work, keys)
        except BaseException:
            self.stop()
            raise

    def _start(self, work: Path, keys: tuple[Path, Path]) -> None:
        state = work / "hub"
        (state / "trust").mkdir(parents=True)
        shutil.copy(keys[1], state / "trust")
        self.hub = hub = Hub(HubConfig(state, broker=self.broker.url, grpc_port=0, admin_port=0, rollout_tick_s=0.2,
                                       serving_profile="x86-64-generic", drift_interval_s=0.5,
                                       drift_window_calls=100))  # fmt: skip
        hub.start()
        assert hub.admin is not None
        self.url = f"http://127.0.0.1:{hub.admin.port}"
        self.state = state
        self.grpc = f"grpc://127.0.0.1:{hub.grpc_port}"
        self.operator = operator_token(state)
        self.admin = AdminClient(self.url, self.operator)
        self.devices = start_fleet(hub, work / "fleet", keys, DEVICES)
        reference = np.random.default_rng(1).standard_normal((256, 32)).astype(np.float32)  # what the apps send
        for release in (1, 2):
            version = f"1.{release}.0"
            directory = artifact(work, MODEL, partial(gemm_onnx, seed=release), ["batch", 32], ["batch", 30],
                                 keys[0], reference, dirname=version, version=version, release=release)  # fmt: skip
            self.admin.add_artifact(directory)
        self.cloud_calls()

    def cloud_calls(self) -> None:
        """Before any deployment the SDK on each device falls back to the hub's cloud route: a few calls
        each, unevenly, for the usage page and the device's calls by route."""
        rows = np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)
        for i, device in enumerate(self.devices):
            with EdgeClient(device.state, cloud=self.grpc) as client:
                for _ in range(5 * (len(self.devices) - i)):
                    assert client.infer(MODEL, {"input": rows}).route == "cloud"

    def cli(self, *args: str) -> str:
        """``cloud-hub ARGS --hub URL --state-dir STATE`` (the operator's token file); its standard output."""
        common = ["--hub", self.url, "--state-dir", str(self.state)]
        result = CliRunner().invoke(hub_cli, [*args, *common])
        assert result.exit_code == 0, result.output
        return str(result.stdout)

    def deploy_from_cli(self) -> str:
        rows = json.loads(self.cli("deploy", f"{MODEL}@1.1.0", "--to", "group:fleet", "--json"))
        assert len(rows) == DEVICES
        self.deployment_id = str(rows[0]["deployment"])
        return self.deployment_id

    def deployed(self) -> None:
        """1.1.0 active on every agent and apps calling it (the deployment test did it, or it is done now)."""
        if self.settled:
            return
        if self.deployment_id is None:
            self.deploy_from_cli()
        wait_for("1.1.0 on every agent", lambda: all(d.active_version(MODEL) == "1.1.0" for d in self.devices), 60)
        for device in self.devices:
            device.start_app(MODEL, rate=40.0)
        self.settled = True

    def local_calls(self, device_id: str) -> int:
        rows = self.admin.request("GET", f"/v1/telemetry?device={device_id}")
        return sum(w["count"] for r in rows for w in r["windows"] if w["route"] == "local")

    def running_rollout(self) -> str:
        """A rollout of 1.2.0 that stays running (its gates want more calls than the test makes)."""
        self.deployed()
        if self.rollout_id is None:
            request = {"model": MODEL, "version": "1.2.0", "target": "group:fleet", "strategy": "waves",
                       "waves": ["1", "100%"],
                       "gates": {"min_calls": 10**9, "min_soak_s": 3600.0, "max_drift_score": None}}  # fmt: skip
            started = self.admin.request("POST", "/v1/rollouts", json.dumps(request).encode())
            assert started["state"] == "running", started
            self.rollout_id = str(started["id"])
        return self.rollout_id

    def stop(self) -> None:
        for device in self.devices:
            device.stop()
        if self.hub is not None:
            self.hub.stop()
        self.broker.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Iterator[Stack]:
    reason = missing()
    if reason is not None:
        pytest.fail(reason)  # `make test` installs them: a missing browser is a broken setup, not a skip
    running = Stack(tmp_path_factory.mktemp("dashboard"), keys)
    try:
        wait_for("every agent online at the hub", lambda: all(
            d["status"] == "online" for d in running.admin.request("GET", "/v1/devices")), 30)  # fmt: skip
        yield running
    finally:
        running.stop()


@pytest.fixture
def browser(stack: Stack) -> Iterator[Browser]:
    opened = Browser(stack.url)
    yield opened
    opened.close()


def logged_in(browser: Browser, token: str, page: str = "fleet") -> None:
    browser.open(page)
    browser.login(token)
    browser.wait_page(page)


def test_a_wrong_token_is_refused_on_the_login_form(stack: Stack, browser: Browser) -> None:
    browser.open("fleet")
    browser.login("not-a-token")
    error = browser.wait_for_element("#login-error")
    assert error.text.strip(), "the login error says nothing"
    assert browser.count('main#page[data-loaded="true"]') == 0  # no page behind the form
    assert browser.wait_for_element("#login-token").is_displayed()


def test_the_operator_sees_the_agents_online_and_a_cli_deploy_progress_live(stack: Stack, browser: Browser) -> None:
    logged_in(browser, stack.operator, "fleet")
    cells = [f'#fleet-table tr[data-device-id="{d.device_id}"] td.status' for d in stack.devices]
    browser.wait("every agent online on the fleet page", lambda: all(browser.text(c) == "online" for c in cells))

    browser.go("deployments")
    browser.wait_page("deployments")
    browser.mark()
    deployment_id = stack.deploy_from_cli()  # the CLI, not the page, starts it
    progress = f'#deployments-table tr[data-deployment-id="{deployment_id}"] td.progress'
    seen: list[str] = []

    def all_active() -> bool:
        text = browser.text(progress)
        if text is not None and (not seen or seen[-1] != text):
            seen.append(text)
        return text == f"{DEVICES}/{DEVICES} active"

    try:
        browser.wait(f"deployment {deployment_id} to show {DEVICES}/{DEVICES} active", all_active, 60)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the progress cell showed {seen}") from None
    assert browser.marker() == "kept", "the page was loaded again: the progress did not arrive live"
    assert browser.driver.current_url.endswith("#/deployments")
    assert all(d.active_version(MODEL) == "1.1.0" for d in stack.devices)  # the page agrees with the agents


def test_a_device_page_shows_its_latency_chart(stack: Stack, browser: Browser) -> None:
    stack.deployed()
    wait_for("dev-00's SDK calls in the hub's telemetry", lambda: stack.local_calls("dev-00") >= 20, 30)
    logged_in(browser, stack.operator, "fleet")
    link = browser.wait_for_element('#fleet-table tr[data-device-id="dev-00"] a.device-link')
    link.click()
    browser.wait_page("device")
    page = browser.wait_for_element("#device-page")
    assert "dev-00" in page.text
    chart = browser.wait_for_element("svg#latency-chart")
    assert chart.size["width"] > 0 and chart.size["height"] > 0


def rollout_page(browser: Browser, rollout_id: str) -> None:
    """The rollout's own page, reached from its row on the rollouts page."""
    browser.go("rollouts")
    browser.wait_page("rollouts")
    browser.wait_for_element(f'tr[data-rollout-id="{rollout_id}"] a.rollout-link').click()
    browser.wait_page("rollout")
    assert rollout_id in (browser.text("main#page") or "")


def test_a_viewer_cannot_press_the_operators_buttons(stack: Stack, browser: Browser) -> None:
    rollout_id = stack.running_rollout()
    logged_in(browser, stack.operator, "fleet")
    rollout_page(browser, rollout_id)
    operator_buttons = browser.wait("the operator's enabled buttons", browser.enabled_buttons)
    assert {"pause", "abort"} & set(operator_buttons), operator_buttons

    viewer = json.loads(stack.cli("tokens", "create", "dashboard-viewer", "--role", "viewer", "--json"))["token"]
    as_viewer = Browser(stack.url)
    try:
        logged_in(as_viewer, viewer, "fleet")
        rollout_page(as_viewer, rollout_id)
        assert as_viewer.enabled_buttons() == []
    finally:
        as_viewer.close()
    assert stack.admin.request("GET", f"/v1/rollouts/{rollout_id}")["state"] == "running"  # nobody pressed


def test_every_page_loads(stack: Stack, browser: Browser) -> None:
    """Each page finishes loading for the operator, with a deployment and a running rollout to show (and,
    with EDGEFED_SCREENSHOTS=1, is photographed into docs/screenshots/)."""
    stack.running_rollout()
    logged_in(browser, stack.operator, "fleet")
    for page in PAGES:
        if page == "device":
            browser.go("fleet")
            browser.wait_page("fleet")
            browser.wait_for_element('#fleet-table tr[data-device-id="dev-00"] a.device-link').click()
            browser.wait_page("device")
            browser.wait_for_element("svg#latency-chart")
        else:
            browser.go(page)
            browser.wait_page(page)
        if page == "drift" and os.environ.get("EDGEFED_SCREENSHOTS") == "1":
            scored(browser)
        browser.screenshot(page)


def scored(browser: Browser, timeout_s: float = 30.0) -> None:
    """The drift page again until the drift job scored a window of the model (for its screenshot)."""
    deadline = time.monotonic() + timeout_s
    while "No drift window scored yet" in (browser.text("main#page") or "") and time.monotonic() < deadline:
        time.sleep(1.0)
        browser.go("fleet")
        browser.wait_page("fleet")
        browser.go("drift")
        browser.wait_page("drift")


def test_a_large_fleet_is_shown_a_page_at_a_time(stack: Stack, browser: Browser) -> None:
    """60 more devices (registered, no agent behind them): 25 rows per page with the range, Next and
    Previous move through them, a filter starts again from its first page, and the choice of rows per page
    is kept when the dashboard is loaded again."""
    assert stack.hub is not None
    for i in range(60):
        stack.hub.registry.upsert_device(f"paged-{i:02d}", profile="raspberry-pi-4", groups=["paged"], tags={})
    total = DEVICES + 60
    logged_in(browser, stack.operator, "fleet")
    rows = "#fleet-table tr[data-device-id]"
    Select(browser.find("#fleet-page-size")).select_by_value("25")
    browser.wait("a page of 25 rows", lambda: browser.count(rows) == 25)
    assert browser.text("#fleet-range") == f"1{DASH}25 of {total}" and not browser.find("#fleet-prev").is_enabled()
    first_page = [tr.get_attribute("data-device-id") for tr in browser.driver.find_elements(By.CSS_SELECTOR, rows)]
    browser.find("#fleet-next").click()
    browser.wait("the second page", lambda: browser.text("#fleet-range") == f"26{DASH}50 of {total}")
    second_page = [tr.get_attribute("data-device-id") for tr in browser.driver.find_elements(By.CSS_SELECTOR, rows)]
    assert len(second_page) == 25 and not set(first_page) & set(second_page)
    browser.find("#fleet-next").click()
    browser.wait("the last page", lambda: browser.text("#fleet-range") == f"51{DASH}{total} of {total}")
    assert browser.count(rows) == total - 50 and not browser.find("#fleet-next").is_enabled()

    browser.find("#fleet-filter").send_keys("group:paged")
    browser.wait("the filter's first page", lambda: browser.text("#fleet-range") == f"1{DASH}25 of 60")
    assert browser.text("#fleet-count") == f"60 of {total} match"
    browser.find("#fleet-prev").click()  # disabled on the first page: nothing moves
    assert browser.text("#fleet-range") == f"1{DASH}25 of 60"

    browser.driver.refresh()
    browser.wait_page("fleet")
    browser.wait("a page of 25 rows again", lambda: browser.count(rows) == 25)
    assert Select(browser.find("#fleet-page-size")).first_selected_option.get_attribute("value") == "25"
