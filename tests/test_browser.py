"""A ClipViewer rendered by JupyterLab in a real headless browser (Debian `chromium` driven by Python `playwright`).

Skipped when chromium or playwright is missing. Install with `apt-get install -y chromium` and `pip install playwright`;
never run `playwright install` (it downloads browsers). Everything is bounded by DEADLINE seconds."""
import json, os, secrets, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CHROMIUM = next((p for p in (shutil.which('chromium'), shutil.which('chromium-browser'), '/usr/bin/chromium')
                 if p and os.path.exists(p)), None)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="needs the Debian 'chromium' package (apt-get install -y chromium)")]
sync_api = pytest.importorskip('playwright.sync_api', reason="needs the 'playwright' pip package (do not run `playwright install`)")
pytest.importorskip('jupyterlab', reason="needs jupyterlab")

DEADLINE = 120      # seconds for the whole test from the server's launch: server start, kernel start, run, asserts
ARGS = ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking',
        '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic']
REPO = Path(__file__).resolve().parents[1]

CELL = """import os, pathlib; pathlib.Path('kernel.pid').write_text(str(os.getpid()))
import torch
from vidkit.widgets import ClipViewer
clip = torch.randint(0, 256, (12, 3, 24, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
viewer = ClipViewer(clip, labels='walking', fps=4)
viewer.frame = 7
viewer"""

CELL2 = """from vidkit.explorer import PredictionExplorer
clips = [torch.randint(0, 256, (6, 3, 24, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
explorer = PredictionExplorer(lambda clip: {0: 0.6, 1: 0.3, 2: 0.1}, list(zip(clips, [0, 1, 2])), vocab=['run', 'walk', 'jump'], topk=3)
explorer"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_status(url, proc, log, until):
    while time.monotonic() < until:
        if proc.poll() is not None: pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return
        except OSError: pass
        time.sleep(0.5)
    pytest.fail(f"jupyter lab did not answer in time:\n{log.read_text()[-3000:]}")


@pytest.fixture
def lab(tmp_path):
    "A JupyterLab server on 127.0.0.1 (random port, a token) serving tmp_path/'root'; stopped (process group) at the end."
    root, token, port = tmp_path/'root', secrets.token_hex(16), free_port()
    root.mkdir()
    settings = tmp_path/'settings'/'@jupyterlab'/'apputils-extension'
    settings.mkdir(parents=True)   # no news / update checks: there is no network, and no toast over the page
    (settings/'notification.jupyterlab-settings').write_text(json.dumps({'fetchNews': 'false', 'checkForUpdates': False}))
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(tmp_path/'settings'), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path/'ws'),
               JUPYTER_RUNTIME_DIR=str(tmp_path/'runtime'), JUPYTER_CONFIG_DIR=str(tmp_path/'config'), MPLBACKEND='Agg',
               PYTHONPATH=os.pathsep.join([str(REPO)] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])))
    log = tmp_path/'lab.log'
    cmd = [sys.executable, '-m', 'jupyter', 'lab', '--no-browser', f'--port={port}', '--ServerApp.port_retries=0',
           '--ServerApp.ip=127.0.0.1', f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={root}',
           '--LabApp.expose_app_in_browser=True', '--allow-root']
    with open(log, 'wb') as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base, deadline = f'http://127.0.0.1:{port}', time.monotonic() + DEADLINE
    try:
        wait_status(f'{base}/api/status?token={token}', proc, log, deadline - 30)
        yield dict(base=base, token=token, root=root, log=log, deadline=deadline)
    finally:
        try: os.killpg(proc.pid, signal.SIGTERM)        # the server shuts its kernels down on SIGTERM
        except ProcessLookupError: pass
        try: proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait(5)
        pid_file = root/'kernel.pid'                     # the kernel runs in its own session: make sure it is gone
        if pid_file.exists():
            try: os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError): pass


def test_widgets_render_and_respond_in_jupyterlab(lab, tmp_path):
    left = lambda: max(1000, int((lab['deadline'] - time.monotonic()) * 1000))   # ms left for the next wait
    nb = new_notebook(cells=[new_markdown_cell('# ClipViewer'), new_code_cell(CELL), new_code_cell(CELL2)],
                      metadata={'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}})
    nbformat.write(nb, lab['root']/'viewer.ipynb')
    expect = sync_api.expect
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={'width': 1200, 'height': 900})
        try:
            errors = []
            page.on('pageerror', lambda e: errors.append(str(e)))
            page.goto(f"{lab['base']}/lab/tree/viewer.ipynb?token={lab['token']}", timeout=left())
            page.wait_for_selector('.jp-NotebookPanel .jp-Cell', timeout=left())
            page.wait_for_function("""() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
                return !!k && k.status === 'idle'; }""", timeout=left())
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            out = page.locator('.jp-Cell').nth(1).locator('.jp-OutputArea-output')
            slider = out.locator('.widget-slider').first
            slider.wait_for(state='visible', timeout=left())
            expect(out.locator('.widget-readout').first).to_have_text('7', timeout=left())
            expect(out.locator('.widget-label', has_text='label: walking')).to_be_visible(timeout=left())
            expect(out.locator('.widget-label', has_text='of 12 frames')).to_be_visible(timeout=left())
            img = out.locator('img').first
            expect(img).to_be_visible(timeout=left())
            page.wait_for_function("img => img.complete && img.naturalWidth === 32 && img.naturalHeight === 24",
                                   arg=img.element_handle(), timeout=left())
            src = img.get_attribute('src')
            assert src and (src.startswith('blob:') or src.startswith('data:')), src
            assert img.evaluate('e => e.getBoundingClientRect().width') >= 255       # small clips are shown scaled up
            # a click in the page goes to the kernel and back: the slider readout and the frame move
            out.locator('button[title="next frame"]').click(timeout=left())
            expect(out.locator('.widget-readout').first).to_have_text('8', timeout=left())
            page.wait_for_function("([img, old]) => img.getAttribute('src') !== old && img.complete && img.naturalWidth === 32",
                                   arg=[img.element_handle(), src], timeout=left())
            # play: the Play widget ticks in the page, the kernel moves the slider and sends new frames
            src = img.get_attribute('src')
            out.locator('.widget-play button').first.click(timeout=left())
            page.wait_for_function("""([img, old]) => img.getAttribute('src') !== old""", arg=[img.element_handle(), src], timeout=left())
            expect(out.locator('.widget-readout').first).not_to_have_text('8', timeout=left())
            out.locator('.widget-play button').first.click(timeout=left())                 # pause
            # the explorer: top-3 bars, the 'mistakes' filter, and a flag that reaches the kernel and comes back
            ex = page.locator('.jp-Cell').nth(2).locator('.jp-OutputArea-output')
            expect(ex.locator('.vk-bar')).to_have_count(3, timeout=left())
            options = ex.locator('.widget-dropdown', has_text='video').locator('option')
            expect(options).to_have_count(3, timeout=left())
            ex.get_by_role('button', name='mistakes only', exact=True).click(timeout=left())
            expect(options).to_have_count(2, timeout=left())      # 'walk' and 'jump' are wrong
            ex.get_by_text('flag as mistake').click(timeout=left())
            expect(ex.get_by_text('3 videos · 2 mistakes (top-1 accuracy 33.3%) · 1 flagged')).to_be_visible(timeout=left())
            shot = tmp_path/'clipviewer.png'
            page.screenshot(path=str(shot), full_page=True)
            ex.screenshot(path=str(tmp_path/'explorer.png'))
            assert shot.stat().st_size > 5000 and (tmp_path/'explorer.png').stat().st_size > 5000
            assert not errors, errors
        except Exception:
            page.screenshot(path=str(tmp_path/'failure.png'), full_page=True)   # for the CI log: what the page showed
            raise
        finally: browser.close()
    assert time.monotonic() < lab['deadline'] + 5
