"The 'customize' tutorials (03 new dataset, 04 custom pipeline, 05 new modules) run as papermill jobs with their defaults and report sane metrics."
import pytest
import json, math
from pathlib import Path

from vidkit.batch import run_notebook

pytestmark = pytest.mark.slow

NBS = Path(__file__).resolve().parent.parent/'nbs'/'tutorials'


def _png(p):
    p = Path(p)
    return p.is_file() and p.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

def _loss(v): return isinstance(v, float) and math.isfinite(v) and 0 < v < 20

def _run(name, out, **params):
    r = run_notebook(NBS/f'{name}.ipynb', out, parameters=params or None, timeout=300, require_metrics=True)
    assert r.output.is_file() and r.out_dir == Path(out)
    return r.metrics


def test_new_dataset(tmp_path):
    m = _run('03_new_dataset', tmp_path/'out')
    assert m['n_train'] + m['n_valid'] == 12 * 2 and m['n_valid'] == 3 * 2           # 12 recordings of 2 actions, 3 for validation
    assert m['n_classes'] == 4 and sorted(m['vocab']) == m['vocab']
    assert m['bad_lines_caught'] == 5 and m['broken_found'] == 3
    assert m['videos_ok'] == m['n_train'] + m['n_valid']
    assert _loss(m['train_loss']) and _loss(m['valid_loss']) and 0 <= m['accuracy'] <= 1
    ann = Path(m['annotations'])
    assert ann.is_file() and ann.read_text().splitlines()[0] == 'file,start_sec,end_sec,action,subset'
    assert _png(m['batch_png']) and Path(m['batch_png']).parent == tmp_path/'out'
    assert json.loads((tmp_path/'out'/'metrics.json').read_text()) == m


def test_custom_pipeline(tmp_path):
    m = _run('04_custom_pipeline', tmp_path/'out')
    assert (m['n_train'], m['n_valid'], m['n_classes'], m['reverse_pairs']) == (12, 6, 6, 2)
    assert m['train_batch_shape'] == [4, 4, 3, 48, 48]
    assert m['valid_batch_shape'][1:] == [2, 4, 3, 48, 48]                                # 2 test positions = 2 views
    s = m['sampler']
    assert s['type'] == 'DenseSampleFrames' and s['test_mode'] is True and (s['clip_len'], s['frame_interval']) == (4, 2)
    assert _loss(m['train_loss']) and _loss(m['valid_loss']) and 0 <= m['accuracy'] <= 1
    assert _png(m['transforms_png']) and _png(m['batch_png'])


def test_new_modules(tmp_path):
    m = _run('05_new_modules', tmp_path/'out')
    assert (m['arch'], m['backbone'], m['loss'], m['opt'], m['param_groups'], m['schedule']) == \
           ('tsn_tiny', 'tiny_cnn', 'my_focal', 'sgd_gc', 'layer_decay', 'warmup_cos')
    assert 1_000 < m['n_params'] < 200_000                                               # the tiny backbone, not a ResNet
    mults = m['lr_mults']
    assert m['n_groups'] == len(mults) == 4 and mults == sorted(mults) and mults[-1] == 1.0
    assert math.isclose(mults[-2], 0.7) and math.isclose(mults[0], 0.7 ** 3)
    lr = 0.05
    assert m['n_iter'] == 9                                                               # 12 videos x repeat 3 / bs 4
    assert math.isclose(m['lr_first'], lr / 100) and lr / 2 < m['lr_max'] <= lr and m['lr_last'] < m['lr_max'] / 5
    assert _loss(m['train_loss']) and _loss(m['valid_loss']) and 0 <= m['accuracy'] <= 1
    assert Path(m['checkpoint']).is_file() and _png(m['schedules_png']) and _png(m['training_png'])


def test_new_modules_chosen_by_name(tmp_path):
    "The parameters pick vidkit's own registered pieces: a torchvision backbone model, plain CE, Adam, its two groups, multi-step decay."
    m = _run('05_new_modules', tmp_path/'out', arch='tsn_r18', loss='cross_entropy', opt='adam', param_groups='video',
             schedule='step', lr=1e-3, n_per_class=2, repeat=4)
    assert (m['arch'], m['backbone'], m['loss'], m['opt'], m['schedule']) == ('tsn_r18', 'resnet18', 'cross_entropy', 'adam', 'step')
    assert m['n_params'] > 10_000_000 and m['n_groups'] == 2 and m['lr_mults'] == [1.0, 1.0]
    assert m['n_iter'] == 4 and math.isclose(m['lr_first'], 1e-3) and math.isclose(m['lr_last'], 1e-5)   # two milestones
    assert _loss(m['train_loss']) and _loss(m['valid_loss'])
