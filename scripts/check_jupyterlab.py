"""Check the notebooks in a real JupyterLab in a real (headless) browser: each opens, one runs with
the kernel JupyterLab picks, and its figures render. Not part of the test suite (it needs Chromium).

    apt-get install chromium chromium-driver; pip install --target /tmp/sel selenium
    mkdir -p /tmp/labroot/notebooks && cp notebooks/0[12]_*.ipynb /tmp/labroot/notebooks/   # a copy: autosave
    jupyter lab --no-browser --port 8899 --IdentityProvider.token='' --ServerApp.root_dir=/tmp/labroot \\
        --expose-app-in-browser &
    python3 scripts/check_jupyterlab.py        # prints cells, kernel, images, errors; screenshots in /tmp

Run 2026-11-25 (JupyterLab 4.6.6, Chromium 156): 01 opened (15 cells, kernel python3 = the venv's
Python), 02 ran all 10 code cells with 0 errors and rendered its 4 figures.
"""

import json
import sys
import time

sys.path.insert(0, "/tmp/sel")  # selenium, installed apart from the project
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402

BASE = "http://127.0.0.1:8899/lab/tree/notebooks"
WIDGET = "const w = window.jupyterapp.shell.currentWidget; "
OPENED = "return window.jupyterapp && document.querySelectorAll('.jp-Notebook .jp-Cell').length > 3"
IDLE = WIDGET + "const k = w && w.sessionContext.session && w.sessionContext.session.kernel; return k && k.status === 'idle'"
KERNEL = WIDGET + "return w.sessionContext.session.kernel.name + ' / ' + w.sessionContext.kernelDisplayName"
PROMPTS = "[...w.node.querySelectorAll('.jp-InputArea-prompt')].map(e => e.textContent)"
DONE = WIDGET + f"return w.sessionContext.session.kernel.status === 'idle' && !{PROMPTS}.some(t => t.includes('*'))"
CELLS = WIDGET + "return w.node.querySelectorAll('.jp-Cell').length"
IMAGES = WIDGET + "return w.node.querySelectorAll('.jp-OutputArea-output img').length"
ERRORS = WIDGET + "return w.node.querySelectorAll('[data-mime-type=\"application/vnd.jupyter.error\"]').length"
RAN = WIDGET + f"return {PROMPTS}.filter(t => /\\[\\d+\\]/.test(t)).length"


def main() -> None:
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.binary_location = "/usr/bin/chromium"
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)

    def wait(script: str, timeout: float, what: str):
        t = time.time()
        while time.time() - t < timeout:
            try:
                if v := d.execute_script(script):
                    return v
            except Exception:  # noqa: BLE001 - the app is still loading
                pass
            time.sleep(1)
        raise SystemExit(f"timeout waiting for {what}")

    out = {}
    for nb, run in (("01_symmetry", False), ("02_geometry", True)):
        d.get(f"{BASE}/{nb}.ipynb")
        wait(OPENED, 120, f"{nb} to open")
        wait(IDLE, 120, "its kernel")
        out[nb] = {"cells": d.execute_script(CELLS), "kernel": d.execute_script(KERNEL)}
        if run:
            d.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            time.sleep(3)
            wait(DONE, 600, "run all")
            out[nb].update(code_cells_run=d.execute_script(RAN), images=d.execute_script(IMAGES),
                           errors=d.execute_script(ERRORS))
        d.save_screenshot(f"/tmp/lab_{nb}.png")
    print(json.dumps(out, indent=1))
    d.quit()


if __name__ == "__main__":
    main()
