"""A learner's path in JupyterLab: open a chapter, run all cells, wait for the widget, change a control, see the output change."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from conftest import ARTIFACTS, ROOT, Visit

JUPYTER = str(Path(sys.executable).parent / "jupyter")


def _free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


@pytest.fixture
def lab(tmp_path):
    """jupyter lab on 127.0.0.1 over a copy of chapter 15 (smoke mode, so the run is short); stopped by pid at the end."""
    nb = nbformat.read(ROOT / "nbs" / "efficient" / "15_prune.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = params.source.replace('MODE = "full"', 'MODE = "smoke"', 1)
    nb.metadata["kernelspec"] = dict(name="python3", display_name="Python 3 (ipykernel)", language="python")
    nbformat.write(nb, tmp_path / "15_prune.ipynb")
    port = _free_port()
    log = open(tmp_path / "lab.log", "w")
    env = dict(os.environ, DLOPT_PROGRESS="1", OMP_NUM_THREADS="1",        # a fresh JupyterLab: no settings or workspace of earlier runs
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "lab-settings"), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "lab-workspaces"))
    proc = subprocess.Popen([JUPYTER, "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--allow-root",
                             "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={tmp_path}",
                             "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                             "--LabApp.expose_app_in_browser=True"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=1); break
            except OSError: time.sleep(0.5)
        else: raise AssertionError("jupyter lab did not start:\n" + (tmp_path / "lab.log").read_text()[-2000:])
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)               # by pid (its process group: the server and its kernels)
        try: proc.wait(timeout=20)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait(timeout=20)
        log.close()
        ARTIFACTS.mkdir(parents=True, exist_ok=True); shutil.copy(tmp_path / "lab.log", ARTIFACTS / "jupyterlab-server.log")


RUN_ALL = "() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); return true; }"   # not awaited: returns at once
# the notebook's kernel status, from JupyterLab's own session (busy while cells run, idle after the last)
KERNEL_IS = ("() => {{ const w = window.jupyterapp.shell.currentWidget; "
             "const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel; "
             "return !!k && k.status === '{}'; }}")
HAS_KERNEL = ("() => { const w = window.jupyterapp.shell.currentWidget; "
              "return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel); }")
NOT_RUN = ("() => { const w = window.jupyterapp.shell.currentWidget; const cells = w.content.model.cells; const out = []; "
           "for (let i = 0; i < cells.length; i++) { const c = cells.get(i); "
           "if (c.type === 'code') out.push([i, c.executionCount, c.sharedModel.getSource().slice(0, 30)]); } "
           "return {status: w.sessionContext.session.kernel.status, cells: out}; }")
ALL_RAN = ("() => { const w = window.jupyterapp.shell.currentWidget; const k = w.sessionContext.session.kernel; "
           "const cells = w.content.model.cells; let ran = true; "
           "for (let i = 0; i < cells.length; i++) { const c = cells.get(i); "
           "if (c.type === 'code' && c.sharedModel.getSource().trim() && c.executionCount === null) ran = false; } "
           "return k.status === 'idle' && ran; }")


@pytest.mark.timeout(420)
def test_run_all_then_change_a_control_in_jupyterlab(lab, browser):
    v = Visit(browser, f"{lab}/lab/tree/15_prune.ipynb")
    page = v.page
    page.set_default_timeout(60000)                       # every wait below has a limit
    try:
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60000)
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.commands.isEnabled('notebook:run-all-cells')", timeout=60000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle'], .jp-DebuggerBugButton", timeout=60000)
        # JupyterLab asks which kernel to start when the notebook opens before its kernel list has loaded: accept
        # the default (Python 3), then wait for the kernel itself
        page.wait_for_function(f"() => ({HAS_KERNEL})() || !!document.querySelector('.jp-Dialog')", timeout=60000)
        accept = page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept")
        if accept.count(): accept.first.click(timeout=10000)
        page.wait_for_function(HAS_KERNEL, timeout=60000)
        for attempt in range(2):                          # Run > Run All Cells; triggered again once if the kernel stays idle
            page.evaluate(RUN_ALL)
            try:
                page.wait_for_function(KERNEL_IS.format("busy"), timeout=30000); break
            except Exception:
                if attempt: raise AssertionError("run-all-cells was triggered twice and the kernel never went busy")
        try: page.wait_for_function(ALL_RAN, timeout=240000)   # idle, every code cell with an execution count
        except Exception as e:
            raise AssertionError(f"not every cell ran: {page.evaluate(NOT_RUN)}") from e
        dropdown = page.locator(".jp-OutputArea .widget-dropdown select").first
        dropdown.wait_for(state="visible", timeout=180000)
        out = page.locator(".jp-OutputArea .widget-vbox .widget-output").first
        out.scroll_into_view_if_needed()                  # JupyterLab skips rendering cells out of view
        # textContent, not innerText: the text is there whether or not the cell is being painted
        try: page.wait_for_function("el => el.textContent.includes('pruned')", arg=out.element_handle(), timeout=60000)
        except Exception as e:
            raise AssertionError(f"the widget's output never showed the pruned model; it shows: {out.text_content()[:800]!r}") from e
        before = out.text_content()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        dropdown.scroll_into_view_if_needed(); page.screenshot(path=str(ARTIFACTS / "jupyterlab-widget.png"), timeout=30000)
        dropdown.select_option("layer")                   # the scope control: the kernel prunes again
        page.wait_for_function("([el, b]) => el.textContent.includes('pruned') && el.textContent !== b", arg=[out.element_handle(), before], timeout=60000)
        assert out.text_content() != before
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        try: page.screenshot(path=str(ARTIFACTS / "jupyterlab-failure.png"), timeout=10000)
        except Exception: pass
        raise
    finally:
        v.close()
