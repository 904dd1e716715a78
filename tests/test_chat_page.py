"""The chat page at / of `picogpt serve`, driven in headless Chromium against a real server process.

The server has a key and a model scripted to answer "hi" with a reply that holds HTML, so the test knows the
exact text that must appear (as text) and can tell whether the page ran any of it.
"""

from __future__ import annotations

import shutil
import time

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tests need selenium (the test extra)")

from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serving import scripted_chat_model, start_server, stop_server  # noqa: E402

from picogpt_lightning.tokenizer import CharTokenizer  # noqa: E402

KEY = "page-key-42"
REPLY = 'Hello <script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> done.'


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-page")
    tokenizer = CharTokenizer.train([REPLY + "Q: A: hi\n"])
    ckpt = scripted_chat_model(folder / "scripted.ckpt", tokenizer, [{"role": "user", "content": "hi"}], REPLY)
    process, url = start_server(ckpt, folder / "server.log", "--api_key", KEY)
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("no Chromium and chromedriver here: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,700"):
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    except WebDriverException as error:
        pytest.skip(f"Chromium would not start: {error.msg.splitlines()[0] if error.msg else error}")
    yield driver
    driver.quit()


def wait(browser, condition, seconds: float = 20):
    return WebDriverWait(browser, seconds).until(lambda _: condition())


def visible(browser, element_id: str) -> bool:
    return browser.find_element(By.ID, element_id).is_displayed()


def test_a_wrong_key_is_refused_then_the_right_one_opens_the_chat(browser, base):
    browser.get(base + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(base + "/")
    wait(browser, lambda: visible(browser, "key-form"))
    assert not visible(browser, "chat-form")
    browser.find_element(By.ID, "key").send_keys("wrong-key", Keys.ENTER)
    wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#messages .error"))
    assert "Incorrect API key" in browser.find_element(By.CSS_SELECTOR, "#messages .error").text
    assert visible(browser, "key-form")
    browser.find_element(By.ID, "key").send_keys(KEY, Keys.ENTER)
    wait(browser, lambda: visible(browser, "chat-form"))
    assert browser.execute_script("return sessionStorage.getItem('picogpt-api-key')") == KEY
    assert browser.find_element(By.ID, "model").text == "picogpt"


def test_a_question_gets_a_streamed_reply_shown_as_text_and_its_html_never_runs(browser, base):
    if not visible(browser, "chat-form"):  # run alone: the key from the test above, kept in the session
        browser.get(base + "/")
        browser.execute_script(f"sessionStorage.setItem('picogpt-api-key', '{KEY}')")
        browser.get(base + "/")
        wait(browser, lambda: visible(browser, "chat-form"))
    browser.find_element(By.ID, "new-chat").click()
    browser.find_element(By.CSS_SELECTOR, "details summary").click()  # the settings
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    # Count how the reply's text changes while it streams: more than once means token by token.
    browser.execute_script("""
        window.replyTexts = [];
        new MutationObserver(() => {
          const reply = document.querySelector('#messages .assistant');
          if (reply && reply.textContent !== window.replyTexts.at(-1)) window.replyTexts.push(reply.textContent);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    """)
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("h", Keys.SHIFT, Keys.ENTER, Keys.SHIFT)  # Shift+Enter: a new line, nothing sent
    assert browser.find_elements(By.CSS_SELECTOR, "#messages .message") == []
    prompt.clear()
    prompt.send_keys("hi", Keys.ENTER)
    wait(browser, lambda: browser.find_element(By.ID, "send").is_enabled()
         and browser.find_elements(By.CSS_SELECTOR, "#messages .assistant"))
    assert [m.text for m in browser.find_elements(By.CSS_SELECTOR, "#messages .message")] == ["hi", REPLY]
    texts = browser.execute_script("return window.replyTexts")
    assert len(texts) > 3 and texts[-1] == REPLY and all(REPLY.startswith(text) for text in texts)
    assert browser.execute_script("return window.pwned === undefined")
    assert browser.find_elements(By.CSS_SELECTOR, "#messages script, #messages img") == []


def test_new_chat_forgets_the_conversation(browser, base):
    if not browser.find_elements(By.CSS_SELECTOR, "#messages .message"):
        pytest.skip("needs the conversation of the test above")
    browser.find_element(By.ID, "new-chat").click()
    time.sleep(0.1)
    assert browser.find_elements(By.CSS_SELECTOR, "#messages *") == []
    assert browser.execute_script("return conversation.length") == 0
