"The `vidkit` command end to end: synth -> train -> resume -> test -> predict, and its error paths."
import json, subprocess, sys
from pathlib import Path
import pytest
from vidkit.cli import main

VIDKIT = str(Path(sys.executable).parent / 'vidkit')

def run(*args, **kw):
    return subprocess.run([VIDKIT, *map(str, args)], capture_output=True, text=True, timeout=600, **kw)

@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp('cli') / 'synth'
    r = run('synth', root, '--n-per-class', 2, '--seed', 1)
    assert r.returncode == 0, r.stderr
    assert 'wrote 12 classes' in r.stdout
    return root

TINY = ['--frames', 4, '--size', 32, '--bs', 4, '--workers', 0]

@pytest.fixture(scope='module')
def trained(synth, tmp_path_factory):
    work = tmp_path_factory.mktemp('work')
    r = run('train', '--arch', 'tsn_r18', '--layout', 'synth', '--data', synth, '--epochs', 2, '--work-dir', work, *TINY)
    assert r.returncode == 0, r.stderr
    return work

def test_train_writes_checkpoints_history_and_metrics(trained):
    m = json.loads((trained / 'metrics.json').read_text())
    assert set(m['metrics']) >= {'train_loss', 'valid_loss', 'accuracy'}
    assert (trained / 'models' / 'last.pth').exists() and (trained / 'models' / 'best.pth').exists()
    lines = (trained / 'history.csv').read_text().splitlines()
    assert lines[0].startswith('epoch') and len(lines) == 3

def test_resume_continues_after_the_last_epoch(synth, trained, tmp_path):
    import shutil
    work = tmp_path / 'w'
    shutil.copytree(trained, work)
    r = run('train', '--arch', 'tsn_r18', '--layout', 'synth', '--data', synth, '--epochs', 3, '--work-dir', work, '--resume', *TINY)
    assert r.returncode == 0, r.stderr
    assert 'resuming after epoch 2' in r.stdout
    import torch
    assert torch.load(work / 'models' / 'last.pth', weights_only=True)['epoch'] == 3

def test_load_from_finetunes_with_a_new_head(synth, trained, tmp_path):
    r = run('train', '--arch', 'tsn_r18', '--layout', 'synth', '--data', synth, '--epochs', 1, '--work-dir', tmp_path,
            '--load-from', trained / 'models' / 'last.pth', *TINY)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / 'models' / 'last.pth').exists()

def test_test_and_predict(synth, trained, tmp_path):
    ckpt = trained / 'models' / 'last.pth'
    r = run('test', ckpt, '--layout', 'synth', '--data', synth, '--num-clips', 2, '--num-crops', 3, '--out', tmp_path / 'res.npz', '--workers', 0)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[0])
    assert 0 <= m['top1_acc'] <= 1 and 'mean_class_accuracy' in m and (tmp_path / 'res.npz').exists()
    video = next((synth / 'videos').rglob('*.mp4'))
    r = run('predict', ckpt, video, '--topk', 3, '--json')
    assert r.returncode == 0, r.stderr
    preds = json.loads(r.stdout)['predictions']
    assert len(preds) == 3 and abs(sum(s for _, s in preds)) <= 1.0001

@pytest.mark.parametrize('args, msg', [
    (['train', '--layout', 'list', '--data', '.'], '--train-list is required'),
    (['train', '--layout', 'hmdb51', '--data', '/nonexistent/hmdb'], '/nonexistent/hmdb: data folder not found'),
    (['predict', 'missing.pth', 'a.mp4'], 'missing.pth: checkpoint not found'),
    (['run', 'missing.ipynb'], 'missing.ipynb: notebook not found'),
    (['check', 'missing_list.txt'], 'missing_list.txt'),
])
def test_user_errors_are_one_line_with_status_1(args, msg, capsys):
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'vidkit {args[0]}: error:') and msg in err

def test_bad_arguments_exit_2():
    r = run('train', '--layout', 'nosuch', '--data', '.')
    assert r.returncode == 2 and 'invalid choice' in r.stderr
    r = run('frobnicate')
    assert r.returncode == 2
    r = run('--help')
    assert r.returncode == 0 and 'train' in r.stdout and 'predict' in r.stdout

def test_predict_bad_video_names_it(trained, tmp_path):
    bad = tmp_path / 'bad.mp4'; bad.write_text('not a video')
    r = run('predict', trained / 'models' / 'last.pth', bad)
    assert r.returncode == 1 and str(bad) in r.stderr and 'Traceback' not in r.stderr

def test_prepare_and_bench_hand_on_their_arguments():
    r = run('prepare', '--help')
    assert r.returncode == 0 and 'hmdb51' in r.stdout
    r = run('bench', '--help')
    assert r.returncode == 0 and 'data' in r.stdout
