"""The web page in real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).

Nothing is downloaded: the chromedriver path is passed explicitly, so Selenium Manager never runs.
"""

from __future__ import annotations

import io
import re
import shutil
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from pixelwise.models import create_model, save_model
from pixelwise.serve import create_app

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs the Debian packages chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
CLASSES = ["background", "cell", "membrane"]
PALETTE = [(20, 20, 20), (230, 60, 60), (60, 200, 90)]


@pytest.fixture
def server(tmp_path):
    """The app served by uvicorn in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    torch.manual_seed(0)
    net = create_model("unet", num_classes=3, base_channels=4, depth=2)
    with torch.no_grad():  # decisive, varied labels from an untrained net (see test_serve.py)
        net.head.weight.mul_(1000)
        net.head.bias.copy_(torch.tensor([0.2, 0.1, 0.0]))
    model = save_model(net, tmp_path / "cells" / "model_best.safetensors",
                       extra={"class_names": CLASSES, "palette": PALETTE})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(create_app([model]), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield url
    uv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,860",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_page_segments_an_upload_and_downloads_the_apis_label_png(server, browser, tmp_path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    rng = np.random.default_rng(0)
    image = tmp_path / "cells.png"
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    api = httpx.post(f"{server}/v1/models/cells/predict", files={"image": ("cells.png", image.read_bytes(), "image/png")},
                     timeout=30)
    stats = httpx.post(f"{server}/v1/models/cells/predict", files={"image": ("cells.png", image.read_bytes(), "image/png")},
                       data={"format": "json"}, timeout=30).json()
    labels = np.array(Image.open(io.BytesIO(api.content)))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    wait = WebDriverWait(browser, 30, poll_frequency=0.1)

    browser.get(server)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    assert Select(browser.find_element(By.ID, "model")).first_selected_option.get_attribute("value") == "cells"
    browser.find_element(By.ID, "file").send_keys(str(image))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", \
        browser.find_element(By.ID, "status").text

    # The overlay: the colour mask over the image, as wide as the image, opacity from the slider.
    overlay = browser.find_element(By.ID, "overlay")
    assert (overlay.get_attribute("width"), overlay.get_attribute("height")) == ("64", "48")
    browser.execute_script("const s = document.getElementById('opacity'); s.value = '0.8';"
                           "s.dispatchEvent(new Event('input'));")
    assert overlay.value_of_css_property("opacity") == "0.8"
    # The mask canvas shows each pixel in its class colour.
    pixel = browser.execute_script("return Array.from(document.getElementById('mask').getContext('2d')"
                                   ".getImageData(5, 7, 1, 1).data.slice(0, 3));")
    assert tuple(pixel) == PALETTE[labels[7, 5]]

    # The legend lists the model's classes with the API's areas.
    rows = browser.find_elements(By.CSS_SELECTOR, "#legend tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows] == CLASSES
    assert [r.find_elements(By.TAG_NAME, "td")[2].text for r in rows] == [
        f"{100 * c['fraction']:.1f} %" for c in stats["classes"]
    ]

    # Hovering reads the class of the pixel under the cursor.
    mask = browser.find_element(By.ID, "mask")
    ActionChains(browser).move_to_element_with_offset(mask, mask.size["width"] // 4, -mask.size["height"] // 5).perform()
    match = re.fullmatch(r"\((\d+), (\d+)\): (\w+)", browser.find_element(By.ID, "hover").text)
    assert match, browser.find_element(By.ID, "hover").text
    x, y = int(match[1]), int(match[2])
    assert abs(x - 48) <= 1 and abs(y - 14) <= 1  # a quarter right of and a fifth above the centre (32, 24)
    assert match[3] == CLASSES[labels[y, x]]

    # The download is the API's label PNG, byte for byte.
    browser.find_element(By.ID, "download").click()
    target = downloads / "cells_labels.png"
    deadline = time.monotonic() + 20
    while not target.is_file():
        assert time.monotonic() < deadline, f"no download in {downloads}: {list(downloads.iterdir())}"
        time.sleep(0.1)
    assert target.read_bytes() == api.content

    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000
