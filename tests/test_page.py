"""GET / (SPEC §8): the page, in a real headless browser (Debian's chromium, driven by
selenium through chromium-driver), over telemetry stored by the real daemon.

The screenshot of each run is kept as page.png in the test's pytest tmp directory
(pytest keeps the last three runs' under /tmp/pytest-of-$USER/); the test prints its path."""

import shutil
import time
import urllib.error
import urllib.request

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.expected_conditions import staleness_of
from selenium.webdriver.support.ui import Select, WebDriverWait

from harness import bind_node, publish, query, register_node, wait_until

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
TOKEN = "grower-token-1"
SAMPLES = 30


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):  # scripts/setup installs both
        pytest.fail("chromium and chromedriver are needed: run ./scripts/setup")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1300", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, what, condition, timeout=20):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, message=what)


def test_the_page_shows_the_nodes_and_charts_stored_telemetry_once_given_the_token(
        make_daemon, broker, database, browser, tmp_path):
    daemon = make_daemon(http={"token": TOKEN})
    daemon.wait_ready()
    uid = register_node(broker.port, database, "esp32-a1b2c3d4e5f6")
    bind_node(daemon, broker.port, database, uid, token=TOKEN)
    other = register_node(broker.port, database, "esp32-0000000000aa", node_type="ec")
    now = int(time.time())
    topic = f"hydro/gh-1/zn-1/{uid}"
    publish(broker.port, [(f"{topic}/ph_sensor/telemetry",
                           {"metric_type": "PH", "value": 5.6 + (i % 5) / 10, "ts": now - 60 * (SAMPLES - i),
                            "unit": "pH"}) for i in range(SAMPLES)]
            + [(f"{topic}/water/telemetry", {"metric_type": "TEMPERATURE", "value": 21.5, "ts": now - 30})])
    wait_until(lambda: query(database, "SELECT count(*) FROM telemetry_samples")[0][0] == SAMPLES + 1,
               what="samples stored")

    # Without the token the page asks for it, and a wrong one is asked for again.
    browser.get(daemon.url + "/")
    token_field = wait(browser, "the token form", lambda d: d.find_element(By.ID, "token").is_displayed()
                       and d.find_element(By.ID, "token"))
    token_field.send_keys("wrong-token\n")
    wait(browser, "the token form again", lambda d: d.find_element(By.ID, "login").is_displayed())
    browser.find_element(By.ID, "token").send_keys(TOKEN + "\n")

    row = wait(browser, "the node's row", lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-uid="{uid}"]'))[0]
    cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
    assert cells[:4] == [uid, "ph", "online", "gh-1 / zn-1"]
    assert cells[4] != "never"
    assert "ph_sensor PH 6 pH" in cells[5]  # the last sample, 5.6 + 0.4 and "water TEMPERATURE 21.5" in cells[5]
    other_row = browser.find_element(By.CSS_SELECTOR, f'tr[data-uid="{other}"]')
    assert [c.text for c in other_row.find_elements(By.TAG_NAME, "td")][2:4] == ["online", "unbound"]

    def charts_drawn(d):
        charts = d.find_elements(By.CSS_SELECTOR, ".chart")
        return charts if len(charts) == 2 and all(c.find_elements(By.TAG_NAME, "canvas") for c in charts) else None

    row.click()
    charts = wait(browser, "both charts drawn", charts_drawn)
    drawn = {c.get_attribute("data-metric"): int(c.get_attribute("data-points")) for c in charts}
    assert drawn == {"PH": SAMPLES, "TEMPERATURE": 1}  # the last 24 hours, by default
    # Another range: the last hour holds every PH sample (one a minute for the last 30 minutes).
    Select(browser.find_element(By.ID, "span")).select_by_value("3600")
    browser.find_element(By.CSS_SELECTOR, "#range button[type=submit]").click()
    wait(browser, "the old charts gone", staleness_of(charts[0]))
    charts = wait(browser, "both charts drawn again", charts_drawn)
    drawn = {c.get_attribute("data-metric"): int(c.get_attribute("data-points")) for c in charts}
    assert drawn == {"PH": SAMPLES, "TEMPERATURE": 1}
    ph = next(c for c in charts if c.get_attribute("data-metric") == "PH")
    assert f"step raw, {SAMPLES} points" in ph.find_element(By.TAG_NAME, "h3").text
    # The line is on the canvas: pixels of its colour (#2f6b2f), not just an empty frame.
    line_pixels = browser.execute_script("""
        const canvas = arguments[0].querySelector('canvas');
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let n = 0;
        for (let i = 0; i < data.length; i += 4)
          if (Math.abs(data[i] - 47) < 12 && Math.abs(data[i + 1] - 107) < 12 && Math.abs(data[i + 2] - 47) < 12
              && data[i + 3] > 200) n++;
        return n;""", ph)
    assert line_pixels > 200, line_pixels

    screenshot = tmp_path / "page.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")
    # Nothing the page needed came from another address.
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(name.startswith(daemon.url + "/") for name in loaded), loaded

    # A link that carries the token in its fragment signs a browser in, and leaves the address bar.
    browser.execute_script("localStorage.clear()")
    browser.get(daemon.url + "/")
    wait(browser, "the token form", lambda d: d.find_element(By.ID, "login").is_displayed())
    browser.get(f"{daemon.url}/#token={TOKEN}")
    wait(browser, "the node's row", lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-uid="{uid}"]'))
    assert "token" not in browser.current_url and not browser.find_element(By.ID, "login").is_displayed()


def test_the_page_and_its_files_are_served_without_the_token_and_hold_no_data(make_daemon, broker, database):
    daemon = make_daemon(http={"token": TOKEN})
    daemon.wait_ready()
    register_node(broker.port, database, "esp32-a1b2c3d4e5f6")
    with urllib.request.urlopen(daemon.url + "/", timeout=10) as answer:
        html, headers = answer.read().decode(), answer.headers
    assert "<title>hydrod</title>" in html and "nd-ph" not in html
    assert headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert headers["X-Frame-Options"] == "DENY" and headers["ETag"]
    unchanged = urllib.request.Request(daemon.url + "/", headers={"If-None-Match": headers["ETag"]})
    with pytest.raises(urllib.error.HTTPError) as not_modified:
        urllib.request.urlopen(unchanged, timeout=10)
    assert not_modified.value.code == 304
    for name, words in [("app.js", "hydrod.token"), ("uPlot.iife.min.js", "uPlot"),
                        ("uPlot.LICENSE", "MIT License"), ("page.css", "body")]:
        status, text = daemon.http("GET", f"/static/{name}")
        assert status == 200 and words in text, name
    assert daemon.http("GET", "/static/secrets.toml")[0] == 404
    assert daemon.http("GET", "/static/..%2Fconfig.toml")[0] == 404
    # The data still needs the token.
    assert daemon.http("GET", "/api/nodes")[0] == 401
