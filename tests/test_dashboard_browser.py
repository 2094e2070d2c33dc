"""The dashboard in a real browser: Debian's chromium and chromedriver through Selenium (nothing downloaded), against
a running fleet that serves it (`fastworker run ... --http-port P --dashboard`) on the session's server.

One fleet and one browser for the module, to keep these few tests fast. The main page's screenshot is saved to
$FASTWORKER_SCREENSHOT when set (`make screenshot` writes docs/dashboard.png), else to a temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fastworker import EmbeddedServer
from tests.conftest import JOB
from tests.test_fleet import Fleet

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = next((path for path in ("/usr/bin/chromedriver", shutil.which("chromedriver")) if path and
                     os.path.exists(path)), None)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[dev]'")
pytest.importorskip("starlette", reason="the dashboard extra is not installed: pip install -e '.[dashboard]'")
if CHROMIUM is None or CHROMEDRIVER is None:
    WHY = "chromium and chromedriver are not installed: apt-get install chromium chromium-driver"
    if os.environ.get("CI"):  # .ci/run installs them: their absence there is a broken CI, not a reason to skip
        pytest.fail(WHY, pytrace=False)
    pytest.skip(WHY, allow_module_level=True)

from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow
TOKEN = "browser-test-token-0123456789"
SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(2)>'
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1000")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    """The fleet serving the dashboard, its server client, and what the test put on the server."""

    def __init__(self, fleet: Fleet, port: int, client: redis.Redis) -> None:
        self.fleet = fleet
        self.url = f"http://127.0.0.1:{port}/dashboard/"
        self.client = client
        self.stream, self.group = fleet.stream, fleet.group
        self.dead = fleet.stream + ":dead"
        self.watchers = "watchers"  # a second group that read 3 entries and never acknowledges them

    def xlen(self, stream: str) -> int:
        return int(self.client.xlen(stream))

    def pending(self, group: str) -> int:
        return int(self.client.xpending(self.stream, group)["pending"])

    def letter_of(self, job_id: str) -> str:
        """The id of the (first) dead letter of `job_id`."""
        for entry_id, fields in self.client.xrange(self.dead):
            if json.loads(fields[b"data"])["job_id"] == job_id:
                return str(entry_id.decode())
        raise AssertionError(f"no dead letter of {job_id}")

    def publish(self, first: int, count: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for index in range(first, first + count):
            job = {"job_id": f"job-{index}", "shop_id": JOB["shop_id"]}
            if index == 0:  # a hostile entry: its fields and payload hold markup
                pipe.xadd(self.stream, {"data": json.dumps({**job, "note": SCRIPT}), "note": SCRIPT, "html": IMG})
            else:
                pipe.xadd(self.stream, {"data": json.dumps(job)})
        pipe.execute()


@pytest.fixture(scope="module")
def served(server: EmbeddedServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    uid = f"dash{os.getpid()}"
    port = free_port()
    fleet = Fleet(server, uid, tmp_path_factory.mktemp("fleet"), FLEET_REJECT_EVERY="5",
                  FASTWORKER_DASHBOARD_TOKEN=TOKEN)
    client = redis.Redis.from_url(server.url)
    board = Served(fleet, port, client)
    board.publish(0, 20)  # job-0, 5, 10 and 15 are rejected: four dead letters
    client.xgroup_create(board.stream, board.watchers, id="0")
    client.xreadgroup(board.watchers, "watcher-1", {board.stream: ">"}, count=3)
    fleet.start("--processes", "1", "--http-port", str(port), "--http-host", "127.0.0.1", "--dashboard",
                "--sample-interval-s", "0.5")
    try:
        fleet.wait(lambda: board.xlen(board.dead) == 4 and board.pending(board.group) == 0, what="20 jobs settled")
        fleet.wait(lambda: _status(board.url) == 200, what="the dashboard")
        yield board
    finally:
        fleet.close()
        client.close()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except OSError:
        return 0


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def wait(driver: Any, condition: Callable[[Any], Any], timeout_s: float = 15) -> Any:
    # The page swaps its panels in on every poll: an element found just before a swap is stale, so look again.
    return WebDriverWait(driver, timeout_s, poll_frequency=0.1,
                         ignored_exceptions=[StaleElementReferenceException]).until(condition)


def text_of(selector: str) -> Callable[[Any], str]:
    """The text of the first element matching `selector`, read in one step (a swap cannot come in between)."""
    def read(driver: Any) -> str:
        script = "const found = document.querySelector(arguments[0]); return found ? found.textContent.trim() : '';"
        return str(driver.execute_script(script, selector))

    return read


def shows(selector: str, expected: Callable[[], str]) -> Callable[[Any], bool]:
    """The element's text equals the server's value, read afresh at each try."""
    return lambda driver: text_of(selector)(driver) == expected()


def metric(stream: str, name: str, group: str | None = None) -> str:
    group_part = f'[data-group="{group}"]' if group else ""
    return f'[data-stream="{stream}"]{group_part}[data-metric="{name}"]'


def test_dashboard_page_shows_the_servers_numbers_live(served: Served, browser: Any,
                                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    browser.get(served.url)
    wait(browser, shows(metric(served.stream, "length"), lambda: str(served.xlen(served.stream))))
    wait(browser, shows(metric(served.stream, "pending", served.watchers), lambda: str(served.pending("watchers"))))
    wait(browser, shows(metric(served.stream, "pending", served.group), lambda: str(served.pending(served.group))))
    wait(browser, shows(metric(served.stream, "dead-letters"), lambda: str(served.xlen(served.dead))))
    assert text_of('[data-worker="0"] [data-metric="worker-state"]')(browser) == "ready"
    assert browser.find_element(By.ID, "unlock").is_displayed()  # writes wait for the token
    assert not browser.find_element(By.ID, "requeue-selected").is_enabled()
    published = 20
    for count in (10, 25, 40, 30, 15):  # bursts the page follows without a reload, one sample each: a chart
        served.publish(published, count)
        published += count
        wait(browser, shows(metric(served.stream, "length"), lambda total=published: str(total)))
    wait(browser, lambda driver: driver.find_elements(By.CSS_SELECTOR, "svg polyline.added"))
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(int(height) + 40, 1400))
    target = os.environ.get("FASTWORKER_SCREENSHOT") or str(tmp_path_factory.mktemp("screenshot") / "dashboard.png")
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(target)
    print(f"screenshot of the dashboard: {target}")
    browser.set_window_size(1280, 1000)


def test_dashboard_requeues_a_dead_letter_through_the_page(served: Served, browser: Any) -> None:
    letter = served.letter_of("job-5")
    browser.get(served.url + "#token=" + TOKEN)
    wait(browser, lambda driver: driver.find_element(By.ID, "unlocked").is_displayed())
    box = wait(browser, expected_conditions.element_to_be_clickable(
        (By.CSS_SELECTOR, f'#dead-letters .pick[data-id="{letter}"]')))
    box.click()
    browser.find_element(By.ID, "requeue-selected").click()
    wait(browser, expected_conditions.visibility_of_element_located((By.ID, "confirm")))
    assert letter in browser.find_element(By.ID, "confirm-text").text
    browser.find_element(By.ID, "confirm-ok").click()
    wait(browser, lambda driver: "requeued 1" in driver.find_element(By.ID, "notice").text)
    assert served.client.xrange(served.dead, letter, letter) == []
    wait(browser, lambda driver: not driver.find_elements(By.CSS_SELECTOR, f'#dead-letters [data-id="{letter}"]'))


def test_dashboard_shows_hostile_fields_as_text(served: Served, browser: Any) -> None:
    letter = served.letter_of("job-0")
    browser.get(served.url)
    opener = wait(browser, expected_conditions.element_to_be_clickable(
        (By.CSS_SELECTOR, f'.open-letter[data-id="{letter}"]')))
    opener.click()
    note = wait(browser, expected_conditions.visibility_of_element_located(
        (By.CSS_SELECTOR, '#letter pre[data-field="note"]')))
    assert note.text == SCRIPT
    assert browser.find_element(By.CSS_SELECTOR, '#letter pre[data-field="html"]').text == IMG
    assert SCRIPT in browser.find_element(By.CSS_SELECTOR, '#letter pre[data-field="data"]').text
    row = browser.find_element(By.CSS_SELECTOR, f'#dead-letters tr[data-id="{letter}"] .preview').text
    assert SCRIPT in row and IMG in row
    assert browser.find_elements(By.CSS_SELECTOR, "#letter img, #dead-letters img, #letter script") == []
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - reading it is the check
