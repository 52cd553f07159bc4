"""vidkit.learner end to end, in real processes: a run killed with SIGKILL in the middle of an epoch and resumed from
its last checkpoint ends with exactly the weights of an uninterrupted run (CPU, fixed seed, with and without DataLoader
workers); `load_from` (weights only) differs from `resume` (everything); CSVLogger keeps the whole history."""
import json, os, signal, subprocess, sys
from pathlib import Path
import pytest
import torch

EPOCHS = 3
KILL_AT = '1:2'            # SIGKILL after the 2nd batch of the 2nd epoch (0-based epoch 1)

# The training script: the same command runs the first time and after a kill (`learn.resume(missing_ok=True)`).
SCRIPT = r'''
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from pathlib import Path
from fastai.callback.core import Callback
from fastai.callback.progress import CSVLogger
from vidkit.core import set_seed
from vidkit.data import VideoDataLoaders
from vidkit.sampling import SampleFrames
from vidkit.learner import video_learner
from vidkit.checkpoint import CheckpointCallback

root, out, nw, epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out.mkdir(parents=True, exist_ok=True)
kill = os.environ.get('VIDKIT_TEST_KILL_AT')          # 'epoch:batch': SIGKILL this process there

class KillAt(Callback):
    "Simulate a crash: SIGKILL (no cleanup, no atexit, no flush) in the middle of an epoch."
    def __init__(self, epoch, n): self.e, self.n = epoch, n
    def after_batch(self):
        if self.training and self.epoch == self.e and self.iter + 1 == self.n: os.kill(os.getpid(), signal.SIGKILL)

set_seed(0)
dls = VideoDataLoaders.from_synthetic(root, size=32, short_side=36, bs=4, num_workers=nw, seed=0,
                                      sampler=SampleFrames(1, num_clips=4))
cbs = [CheckpointCallback(), CSVLogger()] + ([KillAt(*map(int, kill.split(':')))] if kill else [])
learn = video_learner(dls, 'tsn_r18', path=out, cbs=cbs)
start = learn.resume(missing_ok=True)
with learn.no_bar(): learn.fit_one_cycle(epochs, 3e-3)
torch.save(learn.model.state_dict(), out/'final.pth')
(out/'run.json').write_text(json.dumps({'start': start, 'values': [[float(v) for v in vs] for vs in learn.recorder.values]}))
'''


def _start(script, root, out, nw, kill=None):
    env = {k: v for k, v in os.environ.items() if k != 'VIDKIT_TEST_KILL_AT'}
    env['OMP_NUM_THREADS'] = '1'
    if kill: env['VIDKIT_TEST_KILL_AT'] = kill
    return subprocess.Popen([sys.executable, str(script), str(root), str(out), str(nw), str(EPOCHS)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(p, timeout=300):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, err


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    from vidkit.synth import make_synthetic_dataset
    root = tmp_path_factory.mktemp('synth') / 'data'
    make_synthetic_dataset(root, n_per_class=2, size=(40, 48), num_frames=(10, 12), seed=0, rawframes=False)
    return root


WORKERS = (0, 2)

@pytest.fixture(scope='module')
def all_runs(synth, tmp_path_factory):
    """For 0 and 2 DataLoader workers: an uninterrupted run `a`, and a run `b` killed mid-epoch and then started again
    with the same command (it resumes). Independent runs go in parallel to keep the wall time down."""
    tmp = tmp_path_factory.mktemp('runs')
    script = tmp / 'train.py'
    script.write_text(SCRIPT)
    d = {nw: tmp / f'w{nw}' for nw in WORKERS}
    first = {(nw, r): _start(script, synth, d[nw] / r, nw, kill=KILL_AT if r == 'b' else None) for nw in WORKERS for r in 'ab'}
    done = {k: _wait(p) for k, p in first.items()}
    res = {}
    for nw in WORKERS:
        rc, err = done[nw, 'a']
        assert rc == 0, err[-3000:]
        rc, err = done[nw, 'b']
        assert rc == -signal.SIGKILL, (rc, err[-3000:])
        after_kill = sorted(p.name for p in (d[nw] / 'b' / 'models').iterdir())
        ck = torch.load(d[nw] / 'b' / 'models' / 'last.pth', weights_only=True)
        res[nw] = dict(tmp=d[nw], nw=nw, after_kill=after_kill, killed_epoch=ck['epoch'])
    second = {nw: _start(script, synth, d[nw] / 'b', nw) for nw in WORKERS}
    for nw, p in second.items():
        rc, err = _wait(p)
        assert rc == 0, err[-3000:]
    return res


@pytest.fixture(params=WORKERS, ids=[f'workers{n}' for n in WORKERS])
def runs(request, all_runs): return all_runs[request.param]


@pytest.mark.slow
def test_kill_and_resume_gives_identical_weights(runs):
    tmp = runs['tmp']
    assert runs['killed_epoch'] == 1                            # last.pth was written after epoch 0 (1 completed)
    assert 'last.pth' in runs['after_kill'] and not [n for n in runs['after_kill'] if n.endswith('.tmp')]
    a = torch.load(tmp / 'a' / 'final.pth', weights_only=True)
    b = torch.load(tmp / 'b' / 'final.pth', weights_only=True)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ after resume, e.g. {diff[:3]}"
    ra, rb = (json.loads((tmp / r / 'run.json').read_text()) for r in 'ab')
    assert ra['start'] == 0 and rb['start'] == 1
    # the validation loss and metrics of every epoch match (train_loss is fastai's smoothed loss, restarted by a fit)
    assert len(rb['values']) == EPOCHS and [v[1:] for v in rb['values']] == [v[1:] for v in ra['values']]
    ck = torch.load(tmp / 'b' / 'models' / 'last.pth', weights_only=True)
    assert ck['epoch'] == EPOCHS and all(torch.equal(ck['model'][k], a[k]) for k in a)


def test_csvlogger_keeps_the_whole_history(runs):
    import csv
    for r in 'ab':
        rows = list(csv.reader((runs['tmp'] / r / 'history.csv').read_text().splitlines()))
        assert rows[0][:3] == ['epoch', 'train_loss', 'valid_loss'] and 'accuracy' in rows[0] and rows[0][-1] == 'time'
        assert [row[0] for row in rows[1:]] == [str(e) for e in range(EPOCHS)]
    ha = list(csv.reader((runs['tmp'] / 'a' / 'history.csv').read_text().splitlines()))
    hb = list(csv.reader((runs['tmp'] / 'b' / 'history.csv').read_text().splitlines()))
    assert [row[2:-1] for row in hb[1:]] == [row[2:-1] for row in ha[1:]]     # valid_loss, metrics per epoch


def test_load_from_is_not_resume(runs, synth):
    "pretrained= loads weights only (fresh optimizer and schedule, all epochs run); resume() restores everything."
    if runs['nw']: pytest.skip('the checkpoints of one set of runs suffice')
    from vidkit.data import VideoDataLoaders
    from vidkit.sampling import SampleFrames
    from vidkit.learner import video_learner
    from vidkit.checkpoint import ResumeCallback, load_checkpoint
    torch.set_num_threads(1)
    last = runs['tmp'] / 'b' / 'models' / 'last.pth'
    ck = load_checkpoint(last)
    dls = VideoDataLoaders.from_synthetic(synth, size=32, short_side=36, bs=4, num_workers=0, seed=0,
                                          sampler=SampleFrames(1, num_clips=4))
    lf = video_learner(dls, 'tsn_r18', pretrained=last, path=runs['tmp'] / 'lf')
    assert all(torch.equal(lf.model.state_dict()[k], v) for k, v in ck['model'].items())
    assert not any(isinstance(cb, ResumeCallback) for cb in lf.cbs)
    assert not any(set(s) - {'force_train', 'do_wd'} for s in lf.opt.state.values())      # no optimizer moments
    assert not lf.model.backbone.conv1.weight.requires_grad                               # pretrained => frozen
    with lf.no_bar(), lf.no_logging(): lf.fit(1, 1e-4)
    assert len(lf.recorder.values) == 1                                                   # a fresh schedule: it trains

    rs = video_learner(dls, 'tsn_r18', path=runs['tmp'] / 'b')
    assert rs.resume() == EPOCHS
    assert all(torch.equal(rs.model.state_dict()[k], v) for k, v in ck['model'].items())
    moments = [s['grad_avg'] for s in rs.opt.state.values() if 'grad_avg' in s]
    assert moments and any(m.abs().sum() > 0 for m in moments)                           # Adam's state came back
    assert rs.model.backbone.conv1.weight.requires_grad                                   # as it was trained
    with rs.no_bar(), rs.no_logging(), pytest.warns(UserWarning, match='nothing left'): rs.fit_one_cycle(EPOCHS, 3e-3)
    assert all(torch.equal(rs.model.state_dict()[k], v) for k, v in ck['model'].items()) # all epochs were done


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    "A failure in the middle of writing (disk full, crash) never replaces last.pth with a torn file."
    from vidkit.checkpoint import atomic_save
    target = tmp_path / 'models' / 'last.pth'
    atomic_save({'model': {'w': torch.ones(3)}, 'epoch': 1}, target)
    before = target.read_bytes()
    def torn(obj, f, *a, **k):
        f.write(before[:len(before) // 2]); raise KeyboardInterrupt   # half written, then interrupted
    monkeypatch.setattr(torch, 'save', torn)
    with pytest.raises(KeyboardInterrupt): atomic_save({'model': {'w': torch.zeros(3)}, 'epoch': 2}, target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ['last.pth']
    assert torch.load(target, weights_only=True)['epoch'] == 1
