"The main job: the quickstart tutorial run as a batch job with its default parameters, as README's first command does."
import pytest
import json, subprocess, sys
from pathlib import Path

pytestmark = pytest.mark.slow

NB = Path(__file__).resolve().parent.parent / 'nbs' / 'tutorials' / '01_quickstart.ipynb'

def test_quickstart_main_job(tmp_path):
    out = tmp_path / 'quickstart'
    r = subprocess.run([str(Path(sys.executable).parent / 'vidkit'), 'run', str(NB), '--out', str(out)],
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'output notebook: {out / "01_quickstart.ipynb"}' in r.stdout and 'metrics:' in r.stdout and 'plots:' in r.stdout
    m = json.loads((out / 'metrics.json').read_text())
    assert all(0 <= m[k] <= 1 for k in ('accuracy', 'accuracy_temporal', 'accuracy_appearance')) and m['epochs'] >= 1
    import papermill as pm
    promised = float(pm.inspect_notebook(str(NB))['min_accuracy']['default'])
    assert promised >= 0.3 and m['accuracy'] >= promised, m       # the notebook also fails itself below min_accuracy
    assert Path(m['checkpoint']).exists()
    for name in ('batch.png', 'training.png', 'confusion.png', 'per_class.png'): assert (out / name).exists(), name
