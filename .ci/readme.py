#!/usr/bin/env python3
"""Write README.md from nbs/index.ipynb (nbdev_readme needs quarto, which cannot be installed here).
`python .ci/readme.py` rewrites README.md; `python .ci/readme.py --check` exits 1 when it is out of date."""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def render(nb_path=root/'nbs'/'index.ipynb') -> str:
    parts = []
    for cell in json.loads(Path(nb_path).read_text())['cells']:
        src = ''.join(cell['source']).strip('\n')
        lines = src.splitlines()
        if any(l.strip().replace(' ', '') in ('#|hide', '#|exporti') for l in lines): continue
        if cell['cell_type'] == 'markdown': parts.append(src)
        elif cell['cell_type'] == 'code':
            code = '\n'.join(l for l in lines if not l.lstrip().startswith('#|')).strip('\n')
            if code: parts.append(f"```python\n{code}\n```")
    return '\n\n'.join(parts) + '\n'

if __name__ == '__main__':
    text, readme = render(), root/'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit('README.md is out of step with nbs/index.ipynb: run `python .ci/readme.py`')
    else: readme.write_text(text)
