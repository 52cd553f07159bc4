"The repository is consistent: notebooks and library in sync, notebooks clean, README in step with index.ipynb, CI runs the README's command."
import re, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

def _tracked_copy(dst: Path) -> Path:
    "Copy the files git knows about (tracked or untracked-but-not-ignored) into `dst`."
    files = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split('\0')
    for f in filter(None, files):
        src = ROOT / f
        if not src.is_file(): continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / f)
    return dst

def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for d in ('nbs', 'vidkit') for p in (root / d).rglob('*')
            if p.is_file() and '__pycache__' not in p.parts and '.ipynb_checkpoints' not in p.parts}

def test_notebooks_and_library_in_sync(tmp_path):
    "nbdev_export and nbdev_clean change nothing: the library is exported from the notebooks and the notebooks are clean."
    work = _tracked_copy(tmp_path / 'repo')
    before = _snapshot(work)
    for cmd in ('nbdev_export', 'nbdev_clean'):
        r = subprocess.run([str(BIN / cmd)], cwd=work, capture_output=True, text=True)
        assert r.returncode == 0, f'{cmd} failed:\n{r.stdout}\n{r.stderr}'
    after = _snapshot(work)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, ('nbdev_export / nbdev_clean would change these files; run both and commit the result: '
                         + ', '.join(changed))

def test_readme_in_step_with_index():
    r = subprocess.run([sys.executable, str(ROOT / '.ci' / 'readme.py'), '--check'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
