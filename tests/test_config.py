"Recipes from the shell: `vidkit train --config run.yaml [--set k=v]`, the recipe saved beside and inside checkpoints, `--import` of user code, layouts, bad configs."
import json, math, os, shutil, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch, yaml
from vidkit.cli import main

VIDKIT = str(Path(sys.executable).parent / 'vidkit')

def run(*args, **kw):
    return subprocess.run([VIDKIT, *map(str, args)], capture_output=True, text=True, timeout=600, **kw)

@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    from vidkit.synth import make_synthetic_dataset
    return make_synthetic_dataset(tmp_path_factory.mktemp('cfg') / 'synth', n_per_class=2, size=(48, 64), num_frames=(8, 10), seed=0)

TINY = ['--frames', 2, '--size', 32, '--bs', 4, '--workers', 0, '--no-bar']

def _weights(work): return torch.load(Path(work) / 'models' / 'last.pth', weights_only=True)

def _same_weights(a, b):
    wa, wb = _weights(a)['model'], _weights(b)['model']
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

def _train(*args):
    assert main(['train', *map(str, args)]) == 0

def test_yaml_config_reproduces_the_flags_run(synth, tmp_path):
    "The same recipe as flags and as a YAML file gives the same weights; the saved config.yaml reproduces it again."
    _train('--arch', 'tsn_r18', '--data', synth.root, '--epochs', 1, '--seed', 3, '--work-dir', tmp_path / 'flags', *TINY)
    cfg = tmp_path / 'run.yaml'
    cfg.write_text(textwrap.dedent(f"""\
        seed: 3
        work_dir: {tmp_path / 'yaml'}
        learner:
          arch: tsn_r18
        data:
          root: {synth.root}
          frames: 2
          size: 32
          bs: 4
          num_workers: 0
        fit:
          epochs: 1
        """))
    _train('--config', cfg, '--no-bar')
    assert _same_weights(tmp_path / 'flags', tmp_path / 'yaml')
    # the resolved recipe is beside the checkpoints and inside them
    saved = yaml.safe_load((tmp_path / 'flags' / 'config.yaml').read_text())
    assert saved['learner']['arch'] == 'tsn_r18' and saved['data']['size'] == 32 and saved['seed'] == 3
    ck = _weights(tmp_path / 'flags')
    assert ck['recipe'] == saved
    assert json.loads((tmp_path / 'flags' / 'metrics.json').read_text())['config'] == str(tmp_path / 'flags' / 'config.yaml')
    # the saved config is a config: the same run again
    _train('--config', tmp_path / 'flags' / 'config.yaml', '--set', f'work_dir={tmp_path / "again"}', '--no-bar')
    assert _same_weights(tmp_path / 'flags', tmp_path / 'again')

def test_resume_reuses_the_saved_recipe(synth, tmp_path):
    "`--resume` needs only the work dir (its config.yaml); `--resume-from CKPT` continues the run saved in a checkpoint."
    work = tmp_path / 'w'
    _train('--arch', 'tsn_r18', '--data', synth.root, '--epochs', 1, '--work-dir', work, *TINY)
    _train('--work-dir', work, '--resume', '--epochs', 2, '--no-bar')
    ck = _weights(work)
    assert ck['epoch'] == 2 and ck['arch'] == 'tsn_r18' and ck['recipe']['fit']['epochs'] == 2
    other = tmp_path / 'other'
    shutil.copytree(work, other)
    _train('--resume-from', other / 'models' / 'last.pth', '--set', f'work_dir={other}', '--epochs', 3, '--no-bar')
    assert _weights(other)['epoch'] == 3

def test_print_config_shows_the_resolved_recipe(synth, tmp_path, capsys):
    cfg = tmp_path / 'run.yaml'
    cfg.write_text(f"learner: {{arch: tsn_r18}}\ndata: {{root: {synth.root}, size: 32}}\nfit: {{epochs: 3}}\n")
    assert main(['train', '--config', str(cfg), '--bs', '2', '--set', 'fit.schedule={type: cosine, warmup: 0.1}', '--set', 'lr=0.01',
                 '--print-config']) == 0
    r = yaml.safe_load(capsys.readouterr().out)
    assert r['data']['bs'] == 2 and r['data']['size'] == 32 and r['fit']['epochs'] == 3 and r['fit']['lr'] == 0.01
    assert r['fit']['schedule'] == {'type': 'cosine', 'warmup': 0.1} and r['work_dir'] == str(Path('work_dirs') / 'tsn_r18')

def test_every_recipe_key_trains(synth, tmp_path):
    "Sampler, transforms, flips, optimizer and its arguments, parameter groups, schedule, loss, clipping, intervals, metrics."
    cfg = tmp_path / 'run.yaml'
    cfg.write_text(textwrap.dedent(f"""\
        seed: 1
        work_dir: {tmp_path / 'w'}
        data:
          root: {synth.root}
          sampler: {{type: SampleFrames, clip_len: 1, num_clips: 2}}
          size: 32
          bs: 4
          num_workers: 0
          item_tfms: [{{type: Resize, size: 36}}, {{type: CenterCrop, size: 32}}]
          flip: false
        learner:
          arch: tsn_r18
          loss_func: {{type: label_smoothing, eps: 0.1}}
          opt_func: {{type: sgd, mom: 0.9}}
          wd: 1.0e-4
          splitter: fc_lr5
          metrics: [accuracy, {{type: top_k_accuracy, k: 3}}, mean_class_accuracy]
          amp: false
        fit:
          epochs: 3
          lr: 1e-3
          schedule: {{type: cosine, warmup: 0.1}}
          grad_clip: 20
          val_interval: 2
          max_keep_ckpts: 1
        """))
    _train('--config', cfg, '--no-bar')
    work = tmp_path / 'w'
    rows = (work / 'history.csv').read_text().splitlines()
    assert rows[0].split(',')[:6] == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'top3_accuracy', 'mean_class_accuracy']
    assert [math.isnan(float(r.split(',')[2])) for r in rows[1:]] == [True, False, False]      # validated after epochs 2 and 3
    assert sorted(p.name for p in (work / 'models').glob('*.pth')) == ['best.pth', 'epoch_3.pth', 'last.pth']
    ck = _weights(work)
    assert ck['data_cfg']['sampler']['num_clips'] == 2 and ck['recipe']['learner']['splitter'] == 'fc_lr5'

# --- user code: a model, a loss and a sampler registered in a module of the user's -------------------------------------

EXT = '''
from dataclasses import dataclass
import numpy as np, torch, torch.nn as nn
from fastai.losses import LabelSmoothingCrossEntropyFlat
from vidkit.models import register_model
from vidkit.optim import register_loss
from vidkit.data import register_sampler
from vidkit.sampling import SampleFrames

class TinyAvg(nn.Module):
    "A per-frame conv, averaged over space and time, then a linear head."
    def __init__(self, num_classes, width=8):
        super().__init__()
        self.backbone, self.head = nn.Conv2d(3, width, 3, padding=1), nn.Linear(width, num_classes)
        self.default_cfg = {'kind': '2d'}
    def forward(self, x):
        x = x.as_subclass(torch.Tensor)                 # a plain tensor out, whatever tensor subclass came in
        b, t = x.shape[:2]
        return self.head(self.backbone(x.flatten(0, 1)).mean((-2, -1)).view(b, t, -1).mean(1))

@register_model('tiny_avg')
def tiny_avg(num_classes, width:int=8, **kw): return TinyAvg(num_classes, width)

@register_loss('smooth_ce')
def smooth_ce(eps:float=0.1): return LabelSmoothingCrossEntropyFlat(eps=eps)

@register_sampler('FirstFrames')
@dataclass(frozen=True, repr=False)
class FirstFrames(SampleFrames):
    "The first `num_clips` frames, always."
    def _sample(self, total_frames, rng): return np.minimum(np.arange(self.num_clips), total_frames - 1).astype(np.int64)
'''

@pytest.mark.slow
def test_import_of_user_code_trains_tests_and_predicts(synth, tmp_path):
    (tmp_path / 'my_vk_ext.py').write_text(EXT)
    work = tmp_path / 'w'
    r = run('train', '--import', 'my_vk_ext', '--arch', 'tiny_avg', '--data', synth.root, '--epochs', 1, '--work-dir', work,
            '--set', 'learner.loss_func={type: smooth_ce, eps: 0.2}', '--set', 'data.sampler={type: FirstFrames, clip_len: 1, num_clips: 2}',
            *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ckpt = work / 'models' / 'last.pth'
    ck = _weights(work)
    assert ck['arch'] == 'tiny_avg' and ck['data_cfg']['sampler']['type'] == 'FirstFrames'
    assert ck['recipe']['imports'] == ['my_vk_ext']
    # test: the checkpoint's recipe gives the data (and its imports); --import works as well
    r = run('test', ckpt, '--import', 'my_vk_ext', '--num-clips', 2, '--workers', 0, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0 <= m['top1_acc'] <= 1
    r = run('predict', ckpt, synth.videos[0], '--import', 'my_vk_ext', '--json', '--topk', 2, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)['predictions']) == 2
    # without the module: one line that says which module to import
    r = run('predict', ckpt, synth.videos[0], cwd=tmp_path)
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert "unknown model 'tiny_avg'" in r.stderr and '--import my_vk_ext' in r.stderr

def test_custom_sampler_survives_into_the_test_recipe(synth, tmp_path):
    "`sampler_from_cfg` rebuilds a registered sampler: `load_recognizer`, `predict_video` and `evaluate_views` work."
    sys.path.insert(0, str(tmp_path))
    try:
        (tmp_path / 'my_vk_ext2.py').write_text(EXT.replace("'tiny_avg'", "'tiny_avg2'").replace("'smooth_ce'", "'smooth_ce2'")
                                                .replace("'FirstFrames'", "'FirstFrames2'"))
        import my_vk_ext2
        from vidkit.data import sampler_from_cfg, sampler_to_cfg, VideoDataLoaders
        from vidkit.learner import video_learner
        from vidkit.checkpoint import save_checkpoint
        from vidkit.views import evaluate_views
        from vidkit.inference import load_recognizer, predict_video
        s = my_vk_ext2.FirstFrames(clip_len=1, num_clips=2)
        assert sampler_to_cfg(s)['type'] == 'FirstFrames2' and sampler_from_cfg(sampler_to_cfg(s)) == s
        dls = VideoDataLoaders.from_synthetic(synth.root, sampler=s, size=32, bs=4, num_workers=0)
        learn = video_learner(dls, 'tiny_avg2', path=tmp_path)
        ck = save_checkpoint(learn, tmp_path / 'ck.pth')
        rec = load_recognizer(ck, device='cpu')
        assert len(predict_video(rec, synth.videos[0], topk=2)) == 2
        assert 'top1_acc' in evaluate_views(learn, dls.valid_ds.records[:2], num_clips=1, num_crops=1).metrics
    finally: sys.path.remove(str(tmp_path))

# --- layouts -------------------------------------------------------------------------------------------------------------

def _prepared(tmp_path, synth, stem, subs):
    "A dataset root as `vidkit prepare` lays it out (`<stem>_{train,val}_list_videos.txt`, classes, video folders), from the synthetic videos."
    root = tmp_path / stem
    root.mkdir()
    for s in set(subs): (root / s).symlink_to(synth.root, target_is_directory=True)
    shutil.copy(synth.train_list, root / f'{stem}_train_list_videos.txt')
    shutil.copy(synth.val_list, root / f'{stem}_val_list_videos.txt')
    shutil.copy(synth.classes_file, root / f'{stem}_classes.txt')
    return root

@pytest.mark.parametrize('layout, stem, subs, flips', [('kinetics', 'kinetics400', ('videos_train', 'videos_val'), True),
                                                       ('ssv2', 'sthv2', ('videos', 'videos'), False)])
def test_kinetics_and_ssv2_layouts(synth, tmp_path, layout, stem, subs, flips):
    from vidkit.cli import build_parser
    from vidkit.cli_train import make_dls
    from vidkit.transforms import Flip
    root = _prepared(tmp_path, synth, stem, subs)
    args = build_parser().parse_args(['train', '--layout', layout, '--data', str(root), '--frames', '2', '--size', '32', '--workers', '0',
                                      '--augment', 'multiscale'])     # flips are part of the multi-scale recipe
    dls = make_dls(args)
    assert list(dls.vocab) == synth.classes and len(dls.valid_ds) == len(synth.val_list.read_text().split())// 2
    assert any(isinstance(t, Flip) for t in dls.train_ds.tfms.fs) == flips

def test_no_flip_and_flip_label_map(synth, tmp_path, capsys):
    from vidkit.cli import build_parser
    from vidkit.cli_train import make_dls
    from vidkit.transforms import Flip
    args = build_parser().parse_args(['train', '--data', str(synth.root), '--size', '32', '--workers', '0', '--augment', 'multiscale', '--no-flip'])
    assert not any(isinstance(t, Flip) for t in make_dls(args).train_ds.tfms.fs)
    dls = make_dls(build_parser().parse_args(['train', '--data', str(synth.root), '--size', '32', '--workers', '0']))
    assert dls.train_augment == 'light' and not any(isinstance(t, Flip) for t in dls.train_ds.tfms.fs)   # a few clips a class: centre crops
    args = build_parser().parse_args(['train', '--data', str(synth.root), '--size', '32', '--workers', '0', '--set', 'data.flip_label_map={0: 1, 1: 0}',
                                      '--augment', 'multiscale'])
    flip = [t for t in make_dls(args).train_ds.tfms.fs if isinstance(t, Flip)]
    assert flip and flip[0].flip_label_map == {0: 1, 1: 0}

# --- bad configs: one line naming the key (and file and line), what is accepted, status 1, no traceback -------------------

BAD = [  # (YAML text, --set overrides, what the error says)
    ('data:\n  root: {root}\n  sise: 32\n', [], ["line 3: unknown key 'data.sise'; did you mean 'data.size'"]),
    ('fit:\n  epochz: 2\ndata: {{root: {root}}}\n', [], ["line 2: unknown key 'fit.epochz'; did you mean 'fit.epochs'"]),
    ('data:\n  root: {root}\n  bs: four\n', [], ["line 3: data.bs: expected an int, got 'four'"]),
    ('data:\n  root: {root}\n  flip: maybe\n', [], ["line 3: data.flip: expected true or false or null, got 'maybe'"]),
    ('data:\n  root: {root}\n  augment: heavy\n', [], ["line 3: data.augment: 'heavy' is not one of: auto, light, multiscale"]),
    ('data:\n  root: {root}\n', ['fit.epochs=two'], ["--set fit.epochs=two: fit.epochs: expected an int, got 'two'"]),
    ('data:\n  root: {root}\n  layout: list\n  train_list: nope.txt\n  valid_list: nope2.txt\n', [], ['line 4: data.train_list: nope.txt: file not found']),
    ('data:\n  root: /nonexistent/data\n  layout: hmdb51\n', [], ['line 2: data.root: /nonexistent/data: data folder not found']),
    ('load_from: /nonexistent/w.pth\ndata: {{root: {root}}}\n', [], ['line 1: load_from: /nonexistent/w.pth: checkpoint not found']),
    ('learner:\n  arch: tsn_r81\ndata: {{root: {root}}}\n', [], ["line 2: learner.arch: unknown model 'tsn_r81'; did you mean 'tsn_r18'", 'accepted:']),
    ('learner:\n  loss_func: crossentropy\ndata: {{root: {root}}}\n', [], ["learner.loss_func: unknown loss 'crossentropy'; did you mean 'cross_entropy'", 'accepted: bce, cross_entropy']),
    ('learner:\n  opt_func: sdg\ndata: {{root: {root}}}\n', [], ["learner.opt_func: unknown optimizer 'sdg'; did you mean 'sgd'"]),
    ('learner:\n  opt_func: {{type: sgd, momentum: 0.9}}\ndata: {{root: {root}}}\n', [], ["line 2: learner.opt_func: optimizer 'sgd' takes no argument 'momentum' (accepted: lr, mom, wd, decouple_wd)"]),
    ('learner:\n  splitter: fc_lr6\ndata: {{root: {root}}}\n', [], ["unknown parameter-group rule 'fc_lr6'; did you mean 'fc_lr5'"]),
    ('learner:\n  metrics: [acuracy]\ndata: {{root: {root}}}\n', [], ["line 2: learner.metrics[0]: unknown metric 'acuracy'; did you mean 'accuracy'"]),
    ('learner:\n  pretrained: tsm_r18.synthh\ndata: {{root: {root}}}\n', [], ['learner.pretrained: unknown pretrained weights', 'tsm_r18.synth']),
    ('fit:\n  schedule: {{type: cosine, warmpu: 0.1}}\ndata: {{root: {root}}}\n', [], ["fit.schedule: schedule 'cosine' takes no argument 'warmpu' (accepted: warmup, eta_min)"]),
    ('fit:\n  schedule: cosin\ndata: {{root: {root}}}\n', [], ["unknown schedule 'cosin'; did you mean 'cosine'"]),
    ('data:\n  root: {root}\n  sampler: {{type: DenseSampleFrame, clip_len: 4}}\n', [], ["line 3: data.sampler: unknown sampler 'DenseSampleFrame'; did you mean 'DenseSampleFrames'"]),
    ('data:\n  root: {root}\n  item_tfms: [CentreCrop]\n', [], ["line 3: data.item_tfms[0]: unknown transform 'CentreCrop'; did you mean 'CenterCrop'"]),
    ('data:\n  root: {root}\n  layout: kinetic\n', [], ["line 3: data.layout: 'kinetic' is not one of: synth, list"]),
    ('imports: [no_such_vk_module]\ndata: {{root: {root}}}\n', [], ["line 1: imports: no module named 'no_such_vk_module'"]),
    ('data:\n  root: {root}\n  bs: [4\n', [], ['line 4: not valid YAML']),
]

@pytest.mark.parametrize('text, sets, msgs', BAD)
def test_bad_config_is_one_clear_line(synth, tmp_path, capsys, text, sets, msgs):
    cfg = tmp_path / 'run.yaml'
    cfg.write_text(text.format(root=synth.root))
    argv = ['train', '--config', str(cfg)] + [a for s in sets for a in ('--set', s)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith('vidkit train: error: ') and err.count('\n') == 1, err
    for m in msgs: assert m in err, err
    if not sets and 'line' in msgs[0]: assert str(cfg) in err

def test_bad_config_from_the_shell_has_no_traceback(tmp_path):
    r = run('train', '--config', tmp_path / 'missing.yaml')
    assert r.returncode == 1 and r.stderr.strip() == f"vidkit train: error: {tmp_path / 'missing.yaml'}: config file not found"
    r = run('train', '--data', tmp_path, '--set', 'data.bsz=4')
    assert r.returncode == 1 and 'Traceback' not in r.stderr and "unknown key 'data.bsz'; did you mean 'data.bs'" in r.stderr
    r = run('predict', '--import', 'no_such_vk_module', 'x.pth', 'a.mp4')
    assert r.returncode == 1 and "--import: no module named 'no_such_vk_module'" in r.stderr and 'Traceback' not in r.stderr
