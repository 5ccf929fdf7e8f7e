"""The chat page in headless Chromium: type, watch the answer stream in with its statistics, stop
an answer, clear the conversation. `.ci/browser.sh` installs chromium and chromium-driver."""

import shutil

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from helpers import random_head  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serving import PacedGenerator, running_server  # noqa: E402

from eaglespec.cli import build_parser  # noqa: E402
from eaglespec.cli.common import load_engine  # noqa: E402
from eaglespec.generate import GenerationConfig  # noqa: E402
from eaglespec.target import load_target  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
SCREENSHOT = "/tmp/serve_chat.png"


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("chromium or chromedriver not found (bash .ci/browser.sh installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,720", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    head = tmp_path_factory.mktemp("head")
    random_head(load_target(str(tiny_model_dir))).save_pretrained(head)
    args = build_parser().parse_args(["serve", "--model", str(tiny_model_dir), "--draft", str(head), "--dtype",
                                      "float32", "--max-len", "512"])
    plain = load_engine(args)
    return PacedGenerator(plain.target, plain.drafter, pace_s=0.03)  # slow enough to see it stream and stop


def set_value(driver, element_id, value):
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input'));", element_id, str(value))


def test_chat_page_streams_answers_with_statistics(browser, engine, tmp_path):
    question = "w1 w2 w3"
    expected = engine.generate([{"role": "user", "content": question}], GenerationConfig(max_new_tokens=24)).text
    wait = WebDriverWait(browser, 30)
    with running_server(engine) as url:
        browser.get(url + "/")
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        set_value(browser, "temperature", 0)
        set_value(browser, "max-tokens", 24)
        browser.find_element(By.ID, "prompt").send_keys(question)
        browser.find_element(By.ID, "send").click()
        stats = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats"))
        answer = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .content").text
        assert answer == expected.strip()  # greedy through the page is the engine's answer
        assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == question
        assert "tokens/s" in stats[0].text and "acceptance length" in stats[0].text
        browser.save_screenshot(str(tmp_path / "chat.png"))
        browser.save_screenshot(SCREENSHOT)

        # a long answer, stopped while it streams
        set_value(browser, "max-tokens", 400)
        browser.find_element(By.ID, "prompt").send_keys("w4 w5")
        browser.find_element(By.ID, "send").click()
        second = ".msg.assistant:nth-of-type(4)"
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"{second} .content").text)
        browser.find_element(By.ID, "stop").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"{second} .stats"))
        assert browser.find_element(By.CSS_SELECTOR, f"{second} .stats").text == "stopped"
        assert not browser.find_element(By.ID, "stop").is_displayed()

        browser.find_element(By.ID, "clear").click()
        assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
