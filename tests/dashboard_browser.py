"""Test support: the hub's dashboard in headless Chromium, driven by Selenium.

The browser is Debian's ``chromium`` and the driver Debian's ``chromium-driver`` (``make system-deps``
installs both): the driver's path goes to Selenium through ``Service``, so Selenium Manager never runs
and nothing is downloaded at run time. Used by tests/test_dashboard_browser.py and bench/dashboard.py.

The DOM contract it relies on (cloud_hub/dashboard/static/): ``#login-token``, ``#login-submit`` and
``#login-error`` on the login form; ``main#page[data-page=NAME][data-loaded=true]`` once a page finished
loading; pages reached at ``#/NAME`` (fleet, models, deployments, rollouts, drift, usage) and a device
through ``a.device-link`` on the fleet page.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM = Path(os.environ.get("EDGEFED_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("EDGEFED_CHROMEDRIVER", "/usr/bin/chromedriver"))
WINDOW = (1366, 900)  # a laptop screen
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
PAGES = ("fleet", "device", "models", "deployments", "rollouts", "drift", "usage")


def missing() -> str | None:
    """Why no browser can be started here (None: it can)."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            return f"{path} is missing: run 'make system-deps' (apt-get install {package})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -c constraints.txt -e '.[dev]'"
    return None


class Browser:
    """One headless Chromium (its own throw-away profile, fixed window size) on the dashboard at ``base``."""

    def __init__(self, base: str, window: tuple[int, int] = WINDOW) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        reason = missing()
        if reason is not None:
            raise RuntimeError(reason)
        os.environ.setdefault("SE_OFFLINE", "true")  # belt and braces: Selenium Manager would not fetch anything
        self.base = base.rstrip("/")
        self.window = window
        self.profile = Path(tempfile.mkdtemp(prefix="edgefed-chromium-"))
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        arguments = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={window[0]},{window[1]}", f"--user-data-dir={self.profile}", "--no-first-run",
                     "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync"]  # fmt: skip
        for argument in arguments:
            options.add_argument(argument)
        self.driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
        self.driver.set_window_size(*window)

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    # navigation -------------------------------------------------------------------------------------

    def open(self, page: str = "fleet") -> None:
        """Load the dashboard at ``#/page`` (a full page load)."""
        self.driver.get(f"{self.base}/#/{page}")

    def go(self, page: str) -> None:
        """Switch to ``#/page`` inside the loaded dashboard (no page load: the hash changes)."""
        self.driver.execute_script("window.location.hash = arguments[0];", f"#/{page}")

    def login(self, token: str, timeout_s: float = 20.0) -> None:
        """Type ``token`` into the login form and submit it."""
        field = self.wait_for_element("#login-token", timeout_s)
        field.clear()
        field.send_keys(token)
        self.find("#login-submit").click()

    def wait_page(self, page: str, timeout_s: float = 20.0) -> Any:
        """The page container once ``page`` finished loading."""
        return self.wait_for_element(f'main#page[data-page="{page}"][data-loaded="true"]', timeout_s)

    # looking ----------------------------------------------------------------------------------------

    def find(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def find_all(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def wait_for_element(self, selector: str, timeout_s: float = 20.0) -> Any:
        """The first element matching ``selector``, once one is displayed."""

        def shown() -> Any:
            for element in self.find_all(selector):
                if element.is_displayed():
                    return element
            return None

        return self.wait(f"{selector} to be shown", shown, timeout_s)

    def text(self, selector: str) -> str | None:
        """The text of the first element matching ``selector`` (None: none matches); read in the page, so a
        re-rendered table does not leave a stale element behind."""
        value = self.driver.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent.trim() : null;", selector
        )
        return None if value is None else str(value)

    def count(self, selector: str) -> int:
        return int(self.driver.execute_script("return document.querySelectorAll(arguments[0]).length;", selector))

    def enabled_buttons(self, selector: str = "button[data-action]") -> list[str]:
        """The ``data-action`` of every matching button a person could press: not disabled, not
        aria-disabled, inside no disabled fieldset."""
        script = """
            return Array.from(document.querySelectorAll(arguments[0]))
              .filter(b => !b.disabled && !b.matches(':disabled') && b.getAttribute('aria-disabled') !== 'true')
              .map(b => b.getAttribute('data-action'));"""
        return [str(a) for a in self.driver.execute_script(script, selector)]

    def wait(self, what: str, check: Callable[[], Any], timeout_s: float = 20.0) -> Any:
        """Poll ``check`` until it returns something true; on a timeout, fail with what the page shows."""
        from selenium.common.exceptions import StaleElementReferenceException

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                result = check()
            except StaleElementReferenceException:
                result = None
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the page shows: {self.summary()}")
            time.sleep(0.05)

    def summary(self) -> str:
        try:
            url = self.driver.current_url
            body = self.driver.execute_script("return document.body ? document.body.innerText : '';")
            return f"{url}: {str(body)[:1500]!r}"
        except Exception as exc:  # the browser itself is gone
            return f"(no page: {exc})"

    # no reload --------------------------------------------------------------------------------------

    def mark(self, value: str = "kept") -> None:
        """Set a variable on the window: it survives hash changes and DOM updates, never a page load."""
        self.driver.execute_script("window.__edgefedMarker = arguments[0];", value)

    def marker(self) -> str | None:
        value = self.driver.execute_script("return window.__edgefedMarker ?? null;")
        return None if value is None else str(value)

    # screenshots ------------------------------------------------------------------------------------

    def screenshot(self, page: str, max_height: int = 2400) -> Path | None:
        """docs/screenshots/PAGE.png when EDGEFED_SCREENSHOTS=1 (normal runs leave the docs alone): the whole
        page at the window's width, up to ``max_height`` pixels tall."""
        if os.environ.get("EDGEFED_SCREENSHOTS") != "1":
            return None
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{page}.png"
        height, chrome = self.driver.execute_script(
            "return [Math.ceil(document.documentElement.scrollHeight), window.outerHeight - window.innerHeight];"
        )
        self.driver.set_window_size(self.window[0], min(max(int(height) + int(chrome), self.window[1]), max_height))
        try:
            self.driver.execute_script("window.scrollTo(0, 0);")
            if not self.driver.get_screenshot_as_file(str(path)):
                raise AssertionError(f"could not write {path}")
        finally:
            self.driver.set_window_size(*self.window)
        return path
