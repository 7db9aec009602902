"""The chat page at /: served from the package, and driven in headless Chromium (Debian's
`chromium` and `chromium-driver`, with selenium): a streamed answer is read off the page and is
the answer the API gives; the conversation resets; Stop ends a reply."""

import os
import shutil

import httpx
import pytest

from gemmakit.serve import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
MISSING = None if CHROMIUM and DRIVER else "apt-get install chromium chromium-driver"


@pytest.fixture(scope="module")
def server(tiny_lm, server_type):
    s = server_type(create_app(tiny_lm, max_batch=2, max_len=256))
    yield s
    s.stop()


def test_page_and_assets_are_served(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset, kind in (("page/chat.js", "text/javascript"), ("page/chat.css", "text/css")):
        assert asset in page.text
        r = httpx.get(f"{server.url}/{asset}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and r.text
    assert "//" not in page.text.replace("http://", "")  # nothing fetched from elsewhere (no CDN)
    assert httpx.get(server.url + "/page/../app.py").status_code == 404
    assert httpx.get(server.url + "/page/secret.txt").status_code == 404


@pytest.fixture(scope="module")
def browser():
    if MISSING:
        # CI installs them (.ci/run); a machine without them says what to install instead of passing quietly
        if os.environ.get("CI"):
            pytest.fail(f"the chat page test needs Chromium and its driver: {MISSING}")
        pytest.skip(f"the chat page test needs Chromium and its driver: {MISSING}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1000,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _ask(driver, text: str):
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def _replies(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, ".message.assistant")


def _set(driver, field: str, value):
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('change'));", field, str(value))


def test_streams_an_answer_onto_the_page(server, browser, tiny_lm):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(server.url + "/")
    WebDriverWait(browser, 20).until(lambda d: d.find_element("id", "model").text == "gemma-tiny")
    # the random tiny model answers greedily with newlines only: a seeded sample shows words
    _set(browser, "temperature", 1)
    _set(browser, "seed", 7)
    _set(browser, "max_tokens", 12)
    _ask(browser, "the cat sat")
    WebDriverWait(browser, 60).until(lambda d: _replies(d) and _replies(d)[-1].get_attribute("data-done"))
    shown = _replies(browser)[-1].text
    body = {"model": "gemma-tiny", "messages": [{"role": "user", "content": "the cat sat"}], "temperature": 1,
            "max_tokens": 12, "top_p": 1, "seed": 7}
    expected = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    answer = expected["choices"][0]["message"]["content"]
    assert answer.strip() and shown == answer.strip()  # the page shows what the API answers (innerText trims the ends)

    # a second turn sends the whole conversation, the first answer included
    _ask(browser, "and then")
    WebDriverWait(browser, 60).until(lambda d: len(_replies(d)) == 2 and _replies(d)[1].get_attribute("data-done"))
    body["messages"] += [{"role": "assistant", "content": answer}, {"role": "user", "content": "and then"}]
    second = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert _replies(browser)[1].text == second["choices"][0]["message"]["content"].strip()

    browser.find_element("id", "reset").click()
    assert not browser.find_elements("css selector", ".message")
    assert browser.execute_script("return messages.length") == 0


def test_stop_ends_a_reply(server, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    # a seed whose reply runs to max_tokens (the random model often samples <eos> early)
    body = {"model": "gemma-tiny", "messages": [{"role": "user", "content": "tell me a long story"}],
            "max_tokens": 200, "temperature": 1}
    seed = next(s for s in range(100) if httpx.post(server.url + "/v1/chat/completions", json={**body, "seed": s},
                                                    timeout=60).json()["choices"][0]["finish_reason"] == "length")
    browser.get(server.url + "/")
    WebDriverWait(browser, 20).until(lambda d: d.find_element("id", "model").text == "gemma-tiny")
    _set(browser, "max_tokens", 200)
    _set(browser, "seed", seed)
    _ask(browser, "tell me a long story")
    WebDriverWait(browser, 30).until(lambda d: not d.find_element("id", "stop").get_property("disabled"))
    browser.find_element("id", "stop").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element("id", "send").get_property("disabled") is False)
    notes = [n.text for n in browser.find_elements("css selector", ".message.note")]
    assert "(stopped)" in notes
    WebDriverWait(browser, 30).until(lambda d: server.scheduler.stats()["running"] == 0)


def test_an_error_shows_on_the_page(server, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    WebDriverWait(browser, 20).until(lambda d: d.find_element("id", "model").text == "gemma-tiny")
    _set(browser, "max_tokens", 100000)  # beyond the context: the server's 400 says so
    _ask(browser, "hi")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements("css selector", ".message.error"))
    assert "maximum context length" in browser.find_element("css selector", ".message.error").text
    _set(browser, "max_tokens", 512)
