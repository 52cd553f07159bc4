"vidkit.batch end to end: papermill runs that fail, time out, resume and run in parallel; parameter files; papermill's CLI."
import json, pickle, subprocess, sys, warnings
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from vidkit.batch import (NotebookRun, NotebookRunError, expand_grid, load_params, load_sweep, parse_param_pairs,
                          run_notebook, sweep)
from vidkit.core import AnnotationError

BIN = Path(sys.executable).parent

PARAMS = "x: int = 1  # the number to square\nout_dir: str = '.'  # where metrics.json goes\nlog: str = ''  # a file each run appends x to"
BODY = ("import json, os, pathlib, time\n"
        "if log: open(log, 'a').write(f'{x}\\n')\n"
        "if x == 3: raise ValueError(f'x={x} is unlucky')\n"
        "if x == 4: time.sleep(30)\n"
        "y = x * x")
WRITE = "json.dump({'y': y, 'cwd': os.getcwd(), 'nested': {'a': x}}, open(pathlib.Path(out_dir)/'metrics.json', 'w'))"


def make_nb(path, params_src, *body_srcs, kernelspec=True):
    cells = [new_markdown_cell('# job')]
    if params_src is not None: cells.append(new_code_cell(params_src, metadata={'tags': ['parameters']}))
    cells += [new_code_cell(s) for s in body_srcs]
    meta = {'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}} if kernelspec else {}
    nbformat.write(new_notebook(cells=cells, metadata=meta), path)
    return Path(path)


@pytest.fixture
def square(tmp_path):
    (tmp_path/'nbs').mkdir()
    return make_nb(tmp_path/'nbs'/'square.ipynb', PARAMS, BODY, WRITE)


# ---- parameters: no kernel needed ----

def test_parse_param_pairs():
    got = parse_param_pairs([('lr', '0.01'), ('epochs', '3'), ('arch', 'tsn_r18'), ('flag', 'False'), ('w', 'null'),
                             ('sizes', '[1, 2]'), ('cfg', '{a: 1}'), ('tag', "'12'"), ('neg', '-2'), ('eps', '1e-8')])
    assert got == dict(lr=0.01, epochs=3, arch='tsn_r18', flag=False, w=None, sizes=[1, 2], cfg={'a': 1}, tag='12', neg=-2, eps=1e-8)
    assert type(got['epochs']) is int and type(got['flag']) is bool
    assert parse_param_pairs(['a=1', 'a=2', 'p=x=y']) == {'a': 2, 'p': 'x=y'}  # later wins, like papermill
    assert parse_param_pairs([('a', '1')], raw=True) == {'a': '1'}
    assert parse_param_pairs(None) == {}
    with pytest.raises(ValueError, match='not a valid Python identifier'): parse_param_pairs([('1x', '2')])
    with pytest.raises(ValueError, match='NAME=VALUE'): parse_param_pairs(['lr'])


def test_load_params(tmp_path):
    p = tmp_path/'p.yaml'
    p.write_text("# comment\nlr: 0.01\nepochs: 2\npretrained: true\nweights: null\nsizes: [112, 160]\n")
    assert load_params(p) == dict(lr=0.01, epochs=2, pretrained=True, weights=None, sizes=[112, 160])
    (tmp_path/'g.yml').write_text("- {x: 1}\n- {x: 2, y: a}\n")
    assert load_params(tmp_path/'g.yml') == [{'x': 1}, {'x': 2, 'y': 'a'}]
    (tmp_path/'p.json').write_text('{"lr": 0.1, "arch": "tsm"}')
    assert load_params(tmp_path/'p.json') == {'lr': 0.1, 'arch': 'tsm'}
    (tmp_path/'empty.yaml').write_text('')
    assert load_params(tmp_path/'empty.yaml') == {}
    # errors name the file (and line)
    (tmp_path/'bad.yaml').write_text("lr: 0.1\nepochs: 1\narch: [tsn\n")
    with pytest.raises(AnnotationError) as e: load_params(tmp_path/'bad.yaml')
    assert e.value.path.endswith('bad.yaml') and e.value.line == 4 and 'not valid YAML' in str(e.value)
    (tmp_path/'bad.json').write_text('{"lr": 0.1,\n "x": }')
    with pytest.raises(AnnotationError) as e: load_params(tmp_path/'bad.json')
    assert e.value.line == 2 and 'bad.json, line 2' in str(e.value)
    (tmp_path/'scalar.yaml').write_text('3\n')
    with pytest.raises(AnnotationError, match='expected a mapping'): load_params(tmp_path/'scalar.yaml')
    (tmp_path/'name.yaml').write_text('my-lr: 3\n')
    with pytest.raises(AnnotationError, match="'my-lr' is not a valid Python identifier"): load_params(tmp_path/'name.yaml')
    with pytest.raises(FileNotFoundError, match='nope.yaml: parameter file not found'): load_params(tmp_path/'nope.yaml')


def test_expand_grid_errors():
    assert len(expand_grid({'a': [1, 2, 3], 'b': ['x', 'y']})) == 6
    with pytest.raises(ValueError, match='have no values'): expand_grid({'a': []})
    with pytest.raises(TypeError): expand_grid('a=1')


def test_bad_inputs_no_kernel(tmp_path, square):
    with pytest.raises(FileNotFoundError, match='missing.ipynb: notebook not found'): run_notebook(tmp_path/'missing.ipynb', tmp_path/'o')
    with pytest.raises(FileNotFoundError): sweep(tmp_path/'missing.ipynb', {'x': [1]}, tmp_path/'o')
    with pytest.raises(ValueError, match='do not set `out_dir`'): sweep(square, {'x': [1], 'out_dir': ['a']}, tmp_path/'o')
    (tmp_path/'junk.ipynb').write_text('not json')
    with pytest.raises(NotebookRunError, match='junk.ipynb: cannot be read as a notebook'): run_notebook(tmp_path/'junk.ipynb', tmp_path/'o')
    with pytest.raises(ValueError, match='would overwrite the input'): run_notebook(square, square.parent)
    with pytest.raises(NotebookRunError, match="no Jupyter kernel named 'no-such-kernel'"):
        run_notebook(square, tmp_path/'o', kernel_name='no-such-kernel')


# ---- single runs ----

def test_run_notebook_failure(tmp_path, square):
    with pytest.raises(NotebookRunError) as ei: run_notebook(square, tmp_path/'out', {'x': 3})
    e = ei.value
    # cell 2 of the input (title, parameters, body); In [3] because the injected parameters ran as In [2]
    assert (e.cell_index, e.exec_count, e.ename, e.evalue) == (2, 3, 'ValueError', 'x=3 is unlucky')
    msg = str(e)
    assert msg.startswith(f"{square}: cell 2 (In [3]) raised ValueError: x=3 is unlucky")
    assert 'the cell starts: import json, os, pathlib, time' in msg
    assert e.output == str((tmp_path/'out'/'square.ipynb').resolve()) and e.output in msg
    out = nbformat.read(e.output, as_version=4)  # kept, with the traceback and papermill's failure marks
    assert out.metadata.papermill.exception is True
    errs = [o for c in out.cells for o in c.get('outputs', []) if o.output_type == 'error']
    assert len(errs) == 1 and errs[0].ename == 'ValueError' and errs[0].evalue == 'x=3 is unlucky'
    assert not (tmp_path/'out'/'metrics.json').exists()
    assert str(pickle.loads(pickle.dumps(e))) == msg


def test_run_notebook_ok_cwd_unknown_param_stale_metrics(tmp_path, square):
    out = tmp_path/'out'
    out.mkdir()
    (out/'metrics.json').write_text('{"y": -1}')  # stale: must be removed, never returned
    work = tmp_path/'work'
    work.mkdir()
    with pytest.warns(UserWarning, match=r'unknown parameter\(s\) zz \(the notebook declares: x, out_dir, log\)'):
        r = run_notebook(square, out, {'x': 5, 'zz': 1}, cwd=work)
    assert isinstance(r, NotebookRun) and r.metrics == {'y': 25, 'cwd': str(work.resolve()), 'nested': {'a': 5}}
    assert r.parameters == {'x': 5, 'zz': 1, 'out_dir': str(out.resolve())} and r.output == (out/'square.ipynb').resolve()
    assert r.output.exists() and r.duration > 0


def test_missing_metrics_and_no_kernelspec(tmp_path):
    # no kernelspec in the notebook (papermill alone would refuse it) and no metrics written
    nb = make_nb(tmp_path/'quiet.ipynb', "out_dir: str = '.'", "z = 1", kernelspec=False)
    with pytest.raises(NotebookRunError, match=r'quiet.ipynb: wrote no metrics.json into'):
        run_notebook(nb, tmp_path/'o', require_metrics=True)
    assert (tmp_path/'o'/'quiet.ipynb').exists()


def test_timeout(tmp_path, square):
    with pytest.raises(NotebookRunError) as ei: run_notebook(square, tmp_path/'o', {'x': 4}, timeout=2)
    e = ei.value
    assert e.ename == 'CellTimeoutError' and e.cell_index == 2 and 'cell 2 (In [3]) failed with CellTimeoutError' in str(e)
    assert e.output and Path(e.output).exists()


# ---- sweeps ----

def test_sweep_failure_parallel_resume(tmp_path, square):
    log, out = tmp_path/'count.txt', tmp_path/'sweep'
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no warnings expected: all parameters are declared, all ok runs write metrics
        df = sweep(square, {'x': [1, 2, 3]}, out, workers=2, parameters={'log': str(log)}, verbose=False)
    assert list(df.run) == ['run_000_x=1', 'run_001_x=2', 'run_002_x=3']
    assert list(df.status) == ['ok', 'ok', 'failed']
    assert df.y.tolist()[:2] == [1, 4] and pd.isna(df.y.iloc[2]) and df['nested.a'].tolist()[:2] == [1, 2]
    assert df.error.iloc[2] == 'ValueError: x=3 is unlucky' and df.error.iloc[:2].isna().all()
    assert (df.log == str(log)).all() and (df.duration > 0).all()
    assert set(df.cwd.dropna()) == {str(square.parent.resolve())}  # default cwd: the notebook's folder
    assert sorted(log.read_text().split()) == ['1', '2', '3']
    # outputs: one folder per run, the table, the plot, and the failed run's notebook kept for inspection
    assert (out/'run_002_x=3'/'square.ipynb').exists() and (out/'sweep.png').stat().st_size > 0
    csv = pd.read_csv(out/'sweep.csv')
    assert csv.status.tolist() == ['ok', 'ok', 'failed'] and csv.y.tolist()[:2] == [1, 4]
    rec = [json.loads((out/r/'run.json').read_text()) for r in df.run]
    assert 'x=3 is unlucky' in rec[2]['message'] and 'cell 2 (In [3])' in rec[2]['message']
    # workers=2: the first two runs overlapped in time
    assert rec[1]['started'] < rec[0]['finished'] and rec[0]['started'] < rec[1]['finished']

    # resume: the finished runs are not run again, the failed one is retried
    df2 = sweep(square, {'x': [1, 2, 3]}, out, workers=2, parameters={'log': str(log)}, verbose=False)
    assert sorted(log.read_text().split()) == ['1', '2', '3', '3']
    rec2 = [json.loads((out/r/'run.json').read_text()) for r in df2.run]
    assert [r['finished'] for r in rec2[:2]] == [r['finished'] for r in rec[:2]] and rec2[2]['finished'] > rec[2]['finished']
    assert df2.drop(columns='duration').equals(df.drop(columns='duration'))
    assert load_sweep(out)[['run', 'x', 'status', 'y']].equals(df2[['run', 'x', 'status', 'y']])


def test_papermill_help_notebook(square):
    "papermill's own CLI keeps working on a notebook with typed parameters."
    r = subprocess.run([str(BIN/'papermill'), '--help-notebook', str(square)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert 'x: int (default 1)' in r.stdout and 'the number to square' in r.stdout
    assert "out_dir: str (default '.')" in r.stdout
